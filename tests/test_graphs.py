"""Decode steps held whole (tp_infer.engine.graphs) against the eager ones, at world sizes 1 and 2 in real
processes: the torch backend's step compiled (--compile), and a backend's eager step held over static buffers
(CapturedDecode, --cuda-graphs with the cuda backend) through the stand-in capture, which keeps CUDA graphs'
contract on the CPU (the same callable on the same buffers at every replay, nothing read back to the host); that
path also over the cuda backend's Triton kernels in Triton's interpreter. The same logits at every step, padded rows
never disturbing the real ones, the engine's replies unchanged, and the command line's refusals."""

import json
import os
import subprocess

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not CUDA:  # the cuda backend's kernels in Triton's interpreter: set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import rank_fns  # noqa: E402
from graph_rank_fns import PROMPTS, engine_replies, held_decode, refused_captures, schedule  # noqa: E402
from harness import run_ranks  # noqa: E402
from test_batch import ENV, command, run_cli  # noqa: E402

from tp_infer.engine.graphs import (  # noqa: E402
    CapturedDecode,
    NoReadBacks,
    ReadBackError,
    StandInCapture,
    buckets,
    prepare_on_every_rank,
)


def test_buckets_are_powers_of_two_covering_the_largest_batch():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(5) == [1, 2, 4, 8] and buckets(8) == [1, 2, 4, 8]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_decode_steps_give_the_eager_logits(converted, world_size):
    results = run_ranks(world_size, rank_fns.compiled_decode, str(converted["v3"]), timeout=600)
    eager, compiled = results[0][False], results[0][True]
    assert len(eager) == len(compiled) == 8
    for step, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert close(a, b), step
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
    assert all(r[True] == [None] * 8 for r in results[1:]), "followers get no logits"


# world size 1: buckets 1, 2, 4 (3 rows padded into 4, 5 rows eager); world size 2: bucket 2 alone (1 row padded into
# it, 3 rows and more eager): the torch backend's fp32 experts read back to the host past one (token, choice) pair per
# local expert, which a CUDA graph cannot hold (test_a_step_that_reads_back_is_refused_and_runs_eager)
@pytest.mark.parametrize(("world_size", "sizes"), [(1, None), (2, [2])])
def test_held_decode_steps_give_the_eager_logits(converted, world_size, sizes):
    """Histories growing from 3..45 tokens across at least two block boundaries each, to past 90, far past what the
    buckets saw at capture (one token of the spare block), in batches of every size: each step's logits equal
    eager's."""
    results = run_ranks(world_size, held_decode, str(converted["v3"]), sizes, timeout=600)
    out = results[0]
    largest = 4 if sizes is None else 2
    assert out["note"].startswith("decode step held as stand-in graphs (CPU) for batches of ")
    steps = schedule(len(PROMPTS))
    assert all(end // 16 >= start // 16 + 2 for start, end in zip(PROMPTS, out["lengths"], strict=True))
    assert max(out["lengths"]) > 90
    for step, (live, a, b, replayed) in enumerate(zip(steps, out["held"], out["eager"], out["replayed"], strict=True)):
        assert close(a, b), (step, (a - b).abs().max())
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
        assert replayed == (len(live) <= largest), (step, live)
    assert any(len(live) < largest and len(live) not in (sizes or [1, 2, 4]) for live in steps), "a padded batch"
    assert not any(r["held"][0] is not None for r in results[1:]), "followers get no logits"


def test_a_held_step_takes_decode_rows_alone_within_its_bucket_and_width():
    from test_backends import tiny

    from tp_infer.engine.runner import StepPlan
    from tp_infer.kv.pool import KVPool
    from tp_infer.model.attention import cache_layout

    model = tiny()
    pool = KVPool.of(cache_layout(model.args, 1), 12, 16, torch.device("cpu"), spare=1)
    graphs = CapturedDecode(model, pool, 3, 96, StandInCapture())
    assert graphs.sizes == [1, 2, 4] and graphs.width == 6

    def decode(rows: int, blocks: int = 2, **kw) -> StepPlan:
        return StepPlan.from_rows([(list(range(blocks)), 20, [5]) for _ in range(rows)], **kw)

    assert graphs.takes(decode(1)) and graphs.takes(decode(4)) and graphs.takes(decode(2, blocks=6))
    assert not graphs.takes(decode(5)), "past the largest bucket"
    assert not graphs.takes(decode(1, blocks=7)), "tables wider than max_seq_len's"
    assert not graphs.takes(decode(1, all_logits=True))
    assert not graphs.takes(StepPlan.from_rows([([0, 1], 20, [5]), ([2, 3], 0, [6, 7])])), "an extend beside decode"


def test_cuda_graphs_are_refused_off_cuda_and_without_the_cuda_backends_step():
    from tp_infer.backends import cuda as cuda_backend
    from tp_infer.config import ConfigError
    from tp_infer.engine.graphs import CudaGraphCapture
    from tp_infer.generate import check_cuda_graphs

    with pytest.raises(ValueError) as refused:
        CudaGraphCapture(torch.device("cpu"))
    assert str(refused.value) == "CUDA graphs need a CUDA device, not cpu"
    cuda = torch.device("cuda")  # the checks read the device's type only
    with pytest.raises(ConfigError) as refused:
        check_cuda_graphs(cuda, False, "torch", "bf16")
    assert str(refused.value) == (
        "--cuda-graphs alone captures the cuda backend's step, not torch's: choose --backend cuda, or add --compile "
        "for the torch backend's"
    )
    check_cuda_graphs(cuda, True, "torch", "bf16")  # the compiled step's graphs (reduce-overhead)
    if cuda_backend.available():
        check_cuda_graphs(cuda, False, "cuda", "bf16")
        check_cuda_graphs(cuda, False, "auto", "bf16")  # auto picks the cuda backend on CUDA where Triton imports
    with pytest.raises(ConfigError) as refused:
        check_cuda_graphs(torch.device("cpu"), True, "torch", "fp32")
    assert str(refused.value) == "--cuda-graphs needs a CUDA device, not cpu"


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_step_that_reads_back_is_refused_and_runs_eager(converted, world_size):
    """A bucket of 8 rows sends the torch backend's fp32 experts through its per-expert runs, whose lengths it reads
    back (bincount): the stand-in refuses it as CUDA graphs would, and every rank runs eager; so does every rank where
    one alone cannot make them."""
    results = run_ranks(world_size, refused_captures, str(converted["v3"]), timeout=300)
    line, held = results[0]["read_back"]
    assert not held and line.startswith("decode step not held (ReadBackError: bincount reads the device back")
    assert line.endswith("; running eager")
    line, held = results[0]["one_rank"]
    if world_size == 1:
        assert held and line.startswith("decode step held as stand-in graphs made on rank 0 for batches of 1 (")
    else:
        assert not any(r["one_rank"][1] for r in results)
        assert line == "decode step not held (another rank failed to); running eager"


def test_the_stand_in_refuses_read_backs_and_changed_shapes():
    x = torch.arange(6)
    for read_back in (lambda: x.tolist(), lambda: x.sum().item(), lambda: bool(x[1]), lambda: x.nonzero()):
        with pytest.raises(ReadBackError), NoReadBacks():
            read_back()
    with NoReadBacks():  # sized from shapes alone: allowed
        x.repeat_interleave(x, output_size=15)
    with pytest.raises(ReadBackError), NoReadBacks():
        x.repeat_interleave(x)
    rows = [3]
    held = StandInCapture().capture(lambda: x[: rows[0]] * 2)
    rows[0] = 4  # a step whose shape follows something outside its buffers
    with pytest.raises(ReadBackError, match=r"gave \(4,\), captured \(3,\)"):
        held.replay()


@pytest.mark.parametrize(("world_size", "sizes"), [(1, None), (2, [2])])
def test_the_engine_answers_the_same_with_held_decode_steps(converted, world_size, sizes):
    results = run_ranks(world_size, engine_replies, str(converted["v3"]), sizes, timeout=600)
    eager, held = results[0][False], results[0][True]
    assert held["note"].startswith("decode step held as stand-in graphs (CPU) for batches of ")
    assert held["replies"] == eager["replies"]
    assert [len(reply) for reply in eager["replies"][0]] == [8, 8] and len(eager["replies"][2][1]) == 20
    # steps of 1 and 2 rows replayed (and of 3 at world size 1, padded into 4): 6 of 1 row and 6 of 2 each turn
    assert held["replays"] >= (2 * (8 + 6 + 6) - 2 if sizes is None else 2 * (6 + 6) - 2)


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_held_decode_over_the_cuda_backends_kernels_in_the_interpreter(monkeypatch, fp8_weights):
    """The cuda backend's paged decode kernel (and with FP8 weights its block-FP8 products and expert kernels) in
    Triton's interpreter on the CPU (compiled on a GPU), reading block tables as wide as max_seq_len from static
    buffers: its held steps give its eager steps' logits, over histories crossing block boundaries, one row padded
    into a bucket of two."""
    pytest.importorskip("triton")
    from test_backends import tiny

    from tp_infer.backends import triton_kernels as tk
    from tp_infer.backends.cuda import CudaBackend
    from tp_infer.distributed import DistContext
    from tp_infer.engine.runner import ModelRunner, StepPlan

    launches = []

    def counted(name: str):
        launch = getattr(tk, name)

        def counting(*args, **kwargs):
            launches.append(name)
            return launch(*args, **kwargs)

        return counting

    for name in ("mla_decode", "fp8_experts"):
        monkeypatch.setattr(tk, name, counted(name))
    device = "cuda" if CUDA else "cpu"
    model = tiny(device, fp8_weights=fp8_weights)
    model.use_backend(CudaBackend())
    ctx = DistContext(rank=0, world_size=1, device=torch.device(device))
    eager = ModelRunner(model, ctx, 12, 16)
    held = ModelRunner(model, ctx, 12, 16, spare_blocks=1)
    graphs = CapturedDecode(model, held.pool, 2, model.args.max_seq_len, StandInCapture(), sizes=[2])
    assert prepare_on_every_rank(ctx, held, lambda: graphs, "not held").startswith("decode step held as")
    tables, lengths = [[9, 2, 5, 0, 11, 7], [4, 10, 1, 8, 3, 6]], [14, 30]
    prefill = StepPlan.from_rows([(tables[r], 0, list(range(2, 2 + n))) for r, n in enumerate(lengths)])
    for runner in (eager, held):
        runner.execute(prefill)
    launches.clear()
    for step in range(6):
        live = [0, 1] if step % 3 else [1]
        plan = StepPlan.from_rows([(tables[r][: lengths[r] // 16 + 1], lengths[r], [step + 3 * r + 2]) for r in live])
        a, b = held.execute(plan)[0], eager.execute(plan)[0]
        assert close(a, b), (step, (a - b).abs().max())
        for r in live:
            lengths[r] += 1
    assert graphs.replays == 6 and lengths == [18, 36]
    layers = model.args.n_layers
    assert launches.count("mla_decode") == 2 * 6 * layers, "the paged decode kernel in both ways at every layer"
    assert launches.count("fp8_experts") == (2 * 6 * (layers - model.args.n_dense_layers) if fp8_weights else 0)


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


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ("--backend", "cpu", "--compile"),
            "--compile needs --backend torch: the cpu backend's C kernels cannot be held in a graph",
        ),
        (("--cuda-graphs",), "--cuda-graphs needs a CUDA device, not cpu"),
        (("--backend", "torch", "--compile", "--cuda-graphs"), "--cuda-graphs needs a CUDA device, not cpu"),
    ],
)
def test_the_command_line_refuses_graphs_it_cannot_hold(chat_ckpt, tmp_path, flags, error):
    (tmp_path / "in.jsonl").write_text("")
    cli = command(1, chat_ckpt, tmp_path / "in.jsonl", tmp_path / "out.jsonl", *flags)
    done = subprocess.run(cli, env=ENV, capture_output=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.decode().strip().splitlines()[-1] == f"Error: {error}"
