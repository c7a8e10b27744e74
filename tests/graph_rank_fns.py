"""Rank functions of tests/test_graphs.py's held decode steps (module level, so spawned processes import them): the
eager runner and one holding its decode steps (CapturedDecode over the stand-in capture) side by side on one model,
each with its own pool."""

import torch

from tp_infer.backends import reference
from tp_infer.checkpoint import load_model
from tp_infer.config import load_config
from tp_infer.engine.graphs import CapturedDecode, StandInCapture, prepare_on_every_rank
from tp_infer.engine.runner import ModelRunner, StepPlan
from tp_infer.model.layers import TensorParallel

BLOCK, MAX_SEQ_LEN = 16, 128
WIDTH = MAX_SEQ_LEN // BLOCK
# prompt lengths of the rows: inside a block, at its edge, past it, and long; then decode steps of these rows
PROMPTS = [3, 16, 17, 30, 45]


def schedule(rows: int) -> list[list[int]]:
    """The live rows of each decode step: every row (past the largest bucket where rows > 4), then three, two, one,
    four of them in turn, 70 steps in all, so that every row's history crosses several block boundaries."""
    live = [list(range(rows)), [0, 2, 4], [1, 3], [4], [0, 1, 2, 3], [2, 3, 4]]
    return [[r for r in live[s % len(live)] if r < rows] for s in range(70)]


def token(step: int, row: int) -> int:
    return (31 * step + 7 * row * row + 11) % 250 + 2


def model_of(ctx, ckpt_dir):
    args = load_config(f"{ckpt_dir}/config.json", max_seq_len=MAX_SEQ_LEN, max_batch_size=4, dtype="fp32")
    return load_model(args, ckpt_dir, TensorParallel(ctx.rank, ctx.world_size), ctx.device, reference())


def held_decode(ctx, ckpt_dir, sizes):
    """Every row prefilled eager in both runners, then the schedule's decode steps (fixed tokens, so that one step's
    logits do not choose the next's input) in both: each step's logits from both, which steps were replayed, and
    the start-up line."""

    model = model_of(ctx, ckpt_dir)
    rows = len(PROMPTS)
    order = torch.randperm(rows * WIDTH, generator=torch.Generator().manual_seed(3)).tolist()
    tables = [order[r * WIDTH : (r + 1) * WIDTH] for r in range(rows)]  # each row's blocks scattered
    eager = ModelRunner(model, ctx, rows * WIDTH, BLOCK)
    held = ModelRunner(model, ctx, rows * WIDTH, BLOCK, spare_blocks=1)
    graphs = CapturedDecode(model, held.pool, 4, MAX_SEQ_LEN, StandInCapture(), sizes=sizes)
    note = prepare_on_every_rank(ctx, held, lambda: graphs, "decode step not held")
    lengths = list(PROMPTS)
    prefill = StepPlan.from_rows([(tables[r], 0, [token(k, r) for k in range(n)]) for r, n in enumerate(PROMPTS)])
    for runner in (eager, held):
        runner.execute(prefill)
    out = {"eager": [], "held": [], "replayed": [], "note": note}
    for step, live in enumerate(schedule(rows)):
        plan = StepPlan.from_rows([(tables[r][: lengths[r] // BLOCK + 1], lengths[r], [token(step, r)]) for r in live])
        before = graphs.replays
        out["eager"].append(eager.execute(plan)[0])
        out["held"].append(held.execute(plan)[0])
        out["replayed"].append(graphs.replays > before)
        for r in live:
            lengths[r] += 1
    out["lengths"] = lengths
    return out


class CaptureRefusedOnRank1(StandInCapture):
    """The stand-in capture, which cannot be made on rank 1 (as CudaGraphCapture is refused over gloo)."""

    name = "stand-in graphs made on rank 0"

    def __init__(self, rank: int):
        if rank == 1:
            raise RuntimeError("no graphs on this rank")


def refused_captures(ctx, ckpt_dir):
    """The start-up line and whether the runner holds the steps: a bucket whose step reads back to the host (the
    torch backend's fp32 experts past one pair per local expert), and a capture failing on rank 1 alone."""

    model = model_of(ctx, ckpt_dir)
    out = {}
    for name, capture in (("read_back", StandInCapture), ("one_rank", lambda: CaptureRefusedOnRank1(ctx.rank))):
        runner = ModelRunner(model, ctx, 8, BLOCK, spare_blocks=1)
        sizes = [8] if name == "read_back" else [1]
        make = lambda: CapturedDecode(model, runner.pool, 8, MAX_SEQ_LEN, capture(), sizes=sizes)  # noqa: B023, E731
        out[name] = (prepare_on_every_rank(ctx, runner, make, "decode step not held"), runner.graphs is not None)
    return out


def engine_replies(ctx, ckpt_dir, sizes):
    """Three conversations of two turns each, submitted together, replies of 8, 14 and 20 tokens (decode steps of 3,
    2 and 1 rows), through an Engine on the eager runner and on one holding its decode steps (the batch sizes
    `sizes`): each turn's tokens, the steps replayed and the start-up line."""

    from tp_infer.engine.engine import Engine
    from tp_infer.engine.sampling import SamplingParams
    from tp_infer.engine.session import Session

    model = model_of(ctx, ckpt_dir)
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 14, 20)]
    prompts = [[token(k, r) for k in range(n)] for r, n in enumerate([5, 14, 30])]
    out = {}
    for holding in (False, True):
        runner = ModelRunner(model, ctx, 3 * WIDTH, BLOCK, spare_blocks=int(holding))
        graphs, note = None, None
        if holding:
            graphs = CapturedDecode(model, runner.pool, 4, MAX_SEQ_LEN, StandInCapture(), sizes=sizes)
            note = prepare_on_every_rank(ctx, runner, lambda: graphs, "decode step not held")  # noqa: B023
        if ctx.rank != 0:
            runner.follow()
            continue
        engine, sessions = Engine(runner), [Session(f"c{r}") for r in range(len(prompts))]
        replies = [[] for _ in prompts]
        try:
            for turn in range(2):
                turns = []
                for r, session in enumerate(sessions):
                    history = prompts[r] + [t for reply in replies[r] for t in reply]
                    turns.append(engine.submit(session, history + [token(turn, r)] * (turn + 1), None, sampling[r]))
                engine.run(turns)
                for r, t in enumerate(turns):
                    replies[r].append(list(t.generated))
        finally:
            runner.shutdown()
        out[holding] = {"replies": replies, "replays": graphs.replays if graphs else 0, "note": note}
    return out
