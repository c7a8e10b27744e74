"""The tiers under the KV pool: host memory and disk. Conversations the pool evicted come back by copy, token-exact,
computing only their new tokens; files on disk outlive the job and are used only when whole and made for it."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import engine_drivers as drv
import pytest
import rank_fns
from harness import run_ranks
from processes import ENV, REPO, torchrun


def token_lists(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in lengths]


def serve(world_size, ckpt, options, driver, *args):
    return run_ranks(world_size, rank_fns.serve, str(ckpt), options, driver, *args)[0]


ROUNDS = token_lists(21, [20, 6, 9])  # six conversations of 20 + 8 + 6 + 8 + 9 + 8 = 59 tokens


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_host_tier_restores_evicted_conversations(converted, world_size, impl):
    """Six conversations in round robin through a pool that holds one of them: each returning turn finds its whole
    history in host memory and computes only its new tokens, with the outputs of a pool that holds them all."""
    base = {"max_seq_len": 64, "max_batch_size": 1, "attn_impl": impl}
    small = {**base, "pool_tokens": 64, "host_tokens": 512}
    tiered = serve(world_size, converted["v3"], small, drv.round_robin, 6, ROUNDS)
    roomy = serve(world_size, converted["v3"], {**base, "pool_tokens": 1024}, drv.round_robin, 6, ROUNDS)
    for small, large in zip(tiered, roomy, strict=True):
        assert [t["generated"] for t in small] == [t["generated"] for t in large]
        assert [t["computed"] for t in small] == [len(r) for r in ROUNDS]
        for turn in small[1:]:
            assert turn["reused"] == turn["prompt"] - len(ROUNDS[small.index(turn)])
    restored = [t["host"] for conv in tiered for t in conv[1:]]
    assert sum(restored) > 0 and all(t["disk"] == 0 for conv in tiered for t in conv)


# ---- the disk tier, through the batch job's command line -------------------------------------------------------

OPTIONS = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "256", "--max-batch-size", "3", "--max-new-tokens"]
OPTIONS += ["8"]
SHARED = token_lists(31, [32])[0]  # a prefix two of the conversations share
PROMPTS = [SHARED + p for p in token_lists(32, [13, 26])] + token_lists(33, [21])
NEW = token_lists(34, [5, 7, 3])


def batch_job(world_size: int, ckpt, root: Path, name: str, lines: list[dict], *extra: str, **popen) -> tuple:
    """Run one batch job over `lines`; returns its records by id and its stderr."""
    (root / f"{name}.in").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli = ["--ckpt-path", str(ckpt), *OPTIONS, "--input-file", str(root / f"{name}.in")]
    cli += ["--output-file", str(root / f"{name}.out"), *extra]
    cmd = [sys.executable, "-m", "tp_infer.generate", *cli] if world_size == 1 else torchrun(world_size, *cli)
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180, **popen)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(raw) for raw in (root / f"{name}.out").read_text().splitlines()]
    return {r["id"]: r for r in records}, out.stderr


def uninterrupted(world_size, ckpt, root: Path, *extra: str) -> dict:
    """Each conversation's two turns in one job, without a disk tier: the oracle."""
    lines = [{"id": i, "turns_token_ids": [p, n]} for i, (p, n) in enumerate(zip(PROMPTS, NEW, strict=True))]
    records, _ = batch_job(world_size, ckpt, root, "whole", lines, *extra)
    return {i: r["turns"] for i, r in records.items()}


def first_job(world_size, ckpt, root: Path, *extra: str, **popen) -> tuple[dict, str]:
    lines = [{"id": i, "prompt_token_ids": p} for i, p in enumerate(PROMPTS)]
    records, err = batch_job(world_size, ckpt, root, "first", lines, *extra, **popen)
    return {i: r["turns"][0] for i, r in records.items()}, err


def second_job(world_size, ckpt, root: Path, first: dict, *extra: str) -> tuple[dict, str]:
    """Each conversation continued by a new job: its history (prompt and reply) and its new tokens."""
    lines = [
        {"id": i, "prompt_token_ids": p + first[i]["token_ids"] + n}
        for i, (p, n) in enumerate(zip(PROMPTS, NEW, strict=True))
    ]
    records, err = batch_job(world_size, ckpt, root, "second", lines, *extra)
    return {i: r["turns"][0] for i, r in records.items()}, err


@pytest.mark.parametrize(
    ("world_size", "impl", "cache"),
    [(1, "naive", "bf16"), (1, "absorb", "fp8"), (2, "absorb", "bf16"), (2, "naive", "fp8")],
)
def test_a_later_job_continues_conversations_from_disk(converted, tmp_path, world_size, impl, cache):
    """A batch job with --kv-disk-path, then another process group whose lines continue its conversations: the same
    replies as one uninterrupted run, each continued line computing only its new tokens, read from disk."""
    ckpt, setup = converted["v3"], ["--attn-impl", impl, "--kv-cache-dtype", cache]
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    whole = uninterrupted(world_size, ckpt, tmp_path, *setup)
    first, err = first_job(world_size, ckpt, tmp_path, *setup, *disk)
    assert re.search(r"disk tier \S+: 0 blocks from earlier jobs", err), err
    assert [first[i]["token_ids"] for i in range(3)] == [whole[i][0]["token_ids"] for i in range(3)]
    files = sorted((tmp_path / "kv").glob("*/*.safetensors"))
    per_block = 1 if impl == "absorb" else world_size
    history = [len(p) + 8 for p in PROMPTS]
    shared_blocks = len(SHARED) // 16
    assert len(files) == per_block * (sum(-(-h // 16) for h in history) - shared_blocks), "the shared prefix once"
    second, err = second_job(world_size, ckpt, tmp_path, first, *setup, *disk)
    for i in range(3):
        assert second[i]["token_ids"] == whole[i][1]["token_ids"], f"conversation {i}"
        assert second[i]["computed_tokens"] == len(NEW[i]), f"conversation {i}"
        assert second[i]["reused_tokens"] == history[i], f"conversation {i}"
    # read from disk once: the shared prefix serves the second conversation that needs it from the pool
    assert sum(second[i]["disk_tokens"] for i in range(3)) == sum(history) - len(SHARED)
