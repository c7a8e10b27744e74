"""The compiled decode step (tp_infer.engine.graphs) against the eager one, at world sizes 1 and 2 in real
processes: the same logits at every step, padded rows never disturbing the real ones."""

import json
import subprocess

import pytest
import rank_fns
import torch
from harness import run_ranks
from test_batch import ENV, command, run_cli

from tp_infer.engine.graphs import buckets


def test_buckets_are_powers_of_two_covering_the_largest_batch():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(5) == [1, 2, 4, 8] and buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_decode_steps_give_the_eager_logits(converted, world_size):
    results = run_ranks(world_size, rank_fns.compiled_decode, str(converted["v3"]), timeout=600)
    eager, compiled = results[0][False], results[0][True]
    assert len(eager) == len(compiled) == 8
    for step, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert a.shape == b.shape, step
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item(), rtol=0), step
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
    assert all(r[True] == [None] * 8 for r in results[1:]), "followers get no logits"


def test_a_batch_job_with_compiled_decode_answers_as_eager(chat_ckpt, tmp_path):
    """--compile through the command line: start-up compiles the buckets and says so, and a batch job of several
    conversations (decode steps of 1 and 2 rows, prefills eager between them) writes the eager job's replies."""
    lines = [json.dumps({"id": f"c{k}", "turns": [f"Hello number {k}", "And again?"]}) for k in range(3)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    replies = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / f"out{len(flags)}.jsonl"
        done = run_cli(1, chat_ckpt, tmp_path / "in.jsonl", out, "--backend", "torch", "--max-batch-size", "2", *flags)
        if flags:
            assert "decode step compiled for batches of 1, 2 in" in done.stderr.decode()
        replies[flags] = {r["id"]: [t["token_ids"] for t in r["turns"]] for r in map(json.loads, out.open())}
    assert replies[()] == replies[("--compile",)] and len(replies[()]) == 3


def test_compile_refuses_the_cpu_backend(chat_ckpt, tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    cli = command(1, chat_ckpt, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--backend", "cpu", "--compile")
    done = subprocess.run(cli, env=ENV, capture_output=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.decode().strip().splitlines()[-1] == (
        "Error: --compile needs --backend torch: the cpu backend's C kernels cannot be held in a graph"
    )
