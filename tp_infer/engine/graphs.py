"""Decode steps held whole, one per batch bucket (powers of two up to the largest batch), all made at start-up on every
rank; a decode step of R rows runs in the smallest bucket B >= R, its rows padded with B - R rows that write the
pool's spare block (which no turn holds) and whose logits are dropped. Steps that are not decode alone (a prefill or
an extend in the step, logits of every token) and batches past the largest bucket run eager.

- DecodeGraphs (--compile): the torch backend's forward under torch.compile(fullgraph=True), the block tables' width
  a dynamic dimension, so a growing history does not recompile; with cuda_graphs each bucket's graph is also
  captured as a CUDA graph (torch.compile's "reduce-overhead" mode).
- CapturedDecode (--cuda-graphs with the cuda backend): the eager step of a backend that reads nothing back to the
  host, captured as a CUDA graph per bucket (CudaGraphCapture) over static buffers whose shapes never change (the
  block tables as wide as max_seq_len); replay copies the step's inputs into them. StandInCapture keeps CUDA graphs'
  contract on the CPU, for the tests."""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from tp_infer.distributed import DistContext, all_ranks_ok
from tp_infer.engine.runner import ModelRunner, StepPlan, build_batch
from tp_infer.kv.pool import KVPool
from tp_infer.model.batch import AttentionGroup, ForwardBatch
from tp_infer.model.transformer import Transformer


def buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two at or past max_rows."""
    out = [1]
    while out[-1] < max_rows:
        out.append(out[-1] * 2)
    return out


class DecodeGraphs:
    """The compiled decode step of `model` over `pool` (which holds a spare block) for up to max_rows rows."""

    def __init__(self, model: Transformer, pool: KVPool, max_rows: int, cuda_graphs: bool = False):
        assert pool.spare_block is not None, "a compiled decode step pads its rows into the pool's spare block"
        self.model, self.pool = model, pool
        self.buckets = buckets(max_rows)
        self.device = pool.device
        # one graph per bucket (and its recompile for the dynamic width): past dynamo's default of 8 code versions it
        # would fall back to eager silently
        limit = 2 * len(self.buckets) + 4
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, limit * 8
        )
        mode = "reduce-overhead" if cuda_graphs else None
        self.step = torch.compile(self._forward, fullgraph=True, dynamic=False, mode=mode)

    def _forward(self, tokens: torch.Tensor, batch, layers) -> torch.Tensor | None:
        return self.model(tokens, batch, layers, False, False)

    def takes(self, plan: StepPlan) -> bool:
        """Whether the plan is decode alone, within the largest bucket."""
        rows = plan.num_new.numel()
        return 0 < rows <= self.buckets[-1] and not plan.all_logits and bool((plan.num_new == 1).all())

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """The plan's logits [R, V] on rank 0 (None on the others), through its bucket's graph."""
        rows = plan.num_new.numel()
        bucket = next(b for b in self.buckets if b >= rows)
        logits = self.step(*self.inputs(self.padded(plan, bucket)))
        return None if logits is None else logits[:rows]

    def padded(self, plan: StepPlan, bucket: int) -> StepPlan:
        """The plan with bucket - R rows more: one token at position 1 of the spare block each."""
        extra = bucket - plan.num_new.numel()
        if not extra:
            return plan
        tables = torch.zeros(extra, plan.block_tables.shape[1], dtype=torch.long)
        tables[:, 0] = self.pool.spare_block
        return replace(
            plan,
            tokens=torch.cat([plan.tokens, torch.zeros(extra, dtype=torch.long)]),
            start_pos=torch.cat([plan.start_pos, torch.ones(extra, dtype=torch.long)]),
            num_new=torch.cat([plan.num_new, torch.ones(extra, dtype=torch.long)]),
            block_tables=tables if not plan.block_tables.numel() else torch.cat([plan.block_tables, tables]),
        )

    def inputs(self, plan: StepPlan) -> tuple:
        """The graph's arguments: the one decode group read through its block table (never the consecutive-blocks
        view, whose first block would be a constant of the graph), its width in blocks dynamic."""
        batch = build_batch(plan, self.pool.block_size, self.device)
        (group,) = batch.groups
        table, visible = group.block_table, group.visible
        if table.shape[1] == 1:  # at least two blocks wide (the spare one, hidden): a width of 1 would be a constant
            table = torch.cat([table, torch.full_like(table, self.pool.spare_block)], dim=1)
            visible = torch.cat([visible, torch.zeros_like(visible)], dim=2)
        group = replace(group, block_table=table, visible=visible, first_block=None, causal=False)
        torch._dynamo.mark_dynamic(group.block_table, 1)
        torch._dynamo.mark_dynamic(group.visible, 2)
        return plan.tokens.to(self.device), replace(batch, groups=[group]), self.pool.layers

    def warm_up(self) -> str:
        """Compile every bucket now (at start-up, on every rank: the graphs hold the model's collectives), on rows
        of the spare block; a line saying how long it took."""
        start = time.perf_counter()
        for bucket in self.buckets:
            plan = StepPlan(
                tokens=torch.zeros(bucket, dtype=torch.long),
                start_pos=torch.ones(bucket, dtype=torch.long),
                num_new=torch.ones(bucket, dtype=torch.long),
                block_tables=torch.full((bucket, 1), self.pool.spare_block, dtype=torch.long),
                copies=torch.zeros(0, 2, dtype=torch.long),
                transfers=torch.zeros(0, 5, dtype=torch.long),
            )
            self.step(*self.inputs(plan))
        took = time.perf_counter() - start
        return f"decode step compiled for batches of {', '.join(map(str, self.buckets))} in {took:.1f} s"


# Host read-backs (and results sized by the data, which need one on CUDA): a CUDA graph cannot hold them, since its
# replay never returns to the host; the stand-in capture refuses a step that makes any.
READ_BACKS = frozenset(
    {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
        torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select,
        torch.masked_select, torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.Tensor.bincount,
        torch.bincount,
    }
)  # fmt: skip


class ReadBackError(RuntimeError):
    """A step meant for a CUDA graph read a value back to the host."""


class NoReadBacks(TorchFunctionMode):
    """While inside, any read-back (READ_BACKS; repeat_interleave without output_size) raises ReadBackError."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sized_by_data = func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and (
            isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
            and kwargs.get("output_size") is None
        )
        if func in READ_BACKS or sized_by_data:
            raise ReadBackError(f"{getattr(func, '__name__', func)} reads the device back to the host")
        return func(*args, **kwargs)


@dataclass
class Captured:
    """One bucket's step, held: replay() runs it again on its static inputs and leaves its logits in `output`."""

    replay: Callable[[], None]
    output: torch.Tensor


class Capture(Protocol):
    """How a step over static buffers is held: warm_up(step) runs it once outside any capture (Triton compiles its
    kernels, the collectives make their communicators), capture(step) holds it; pool_bytes() is what the held steps'
    memory took so far."""

    name: str

    def warm_up(self, step: Callable[[], torch.Tensor]) -> None: ...

    def capture(self, step: Callable[[], torch.Tensor]) -> Captured: ...

    def pool_bytes(self) -> int: ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph, captured on a side stream, every bucket's graph in one memory pool (captured largest
    first, the smaller ones reuse its memory). The model's collectives are captured too, which NCCL allows and gloo
    does not."""

    name = "CUDA graphs"

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "nccl":
            raise ValueError(f"CUDA graphs hold the model's collectives, which needs NCCL, not {dist.get_backend()}")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.reserved = None  # the allocator's reserved bytes before the first capture

    def warm_up(self, step: Callable[[], torch.Tensor]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def capture(self, step: Callable[[], torch.Tensor]) -> Captured:
        if self.reserved is None:  # after every warm-up, whose cached memory is handed back (as capture does anyway)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.reserved = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls during the capture (NCCL's watchdog polling its events) are theirs
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            output = step()
        torch.cuda.synchronize(self.device)
        self.graphs.append(graph)
        return Captured(replay=graph.replay, output=output)

    def pool_bytes(self) -> int:
        return 0 if self.reserved is None else torch.cuda.memory_reserved(self.device) - self.reserved


class StandInCapture:
    """CUDA graphs' contract without a GPU, for the tests: capture runs the step once on its static buffers, replay
    runs the same callable on the same buffers again and copies its logits into the captured output. A step that read
    anything but its static buffers would answer the captured batch again; one whose shapes changed, or that read a
    value back to the host (NoReadBacks), fails."""

    name = "stand-in graphs (CPU)"

    def warm_up(self, step: Callable[[], torch.Tensor]) -> None:
        step()

    def capture(self, step: Callable[[], torch.Tensor]) -> Captured:
        with NoReadBacks():
            output = step()

        def replay() -> None:
            with NoReadBacks():
                again = step()
            if again.shape != output.shape or again.dtype != output.dtype:
                raise ReadBackError(f"the replayed step gave {tuple(again.shape)}, captured {tuple(output.shape)}")
            output.copy_(again)

        return Captured(replay=replay, output=output)

    def pool_bytes(self) -> int:
        return 0


class CapturedDecode:
    """The eager decode step of the model's backend (the cuda backend's Triton kernels, or the torch backend's ops:
    anything that reads nothing back to the host) held per batch bucket by `capture` over static buffers: each
    bucket's rows' token, position, slot and block table [width = the blocks of max_seq_len] in one int64 buffer, the
    rows' lengths and attention masks made from them inside the step. A step of R rows runs in the smallest bucket
    B >= R: its inputs are copied into the bucket's buffer (in one copy), rows R..B-1 a token at position 0 of the
    spare block, and the step is replayed; the logits are its first R rows. The tables' width never changes, so a
    history growing towards max_seq_len replays the same graph. The logits are gathered on every rank inside the step
    (an all-gather: NCCL captures it), rank 0 keeps them. Other steps (prefill, extend, wider batches) run eager."""

    def __init__(self, model: Transformer, pool: KVPool, max_rows: int, max_seq_len: int, capture: Capture, sizes=None):
        """sizes: the batch sizes held (default the buckets of max_rows)."""
        assert pool.spare_block is not None, "a held decode step pads its rows into the pool's spare block"
        self.model, self.pool, self.capture = model, pool, capture
        self.sizes = sorted(sizes or buckets(max_rows))
        self.width = -(-max_seq_len // pool.block_size)
        self.rank = model.tp.rank
        self.held: dict[int, tuple[torch.Tensor, Captured]] = {}
        self.replays = 0  # steps answered by replay (the tests count them)

    def takes(self, plan: StepPlan) -> bool:
        """Whether the plan is decode alone, within the largest bucket and the tables' width."""
        rows = plan.num_new.numel()
        return (
            0 < rows <= self.sizes[-1]
            and not plan.all_logits
            and plan.block_tables.shape[1] <= self.width
            and bool((plan.num_new == 1).all())
        )

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """The plan's logits [R, V] on rank 0 (None on the others), by its bucket's replay."""
        rows = plan.num_new.numel()
        bucket = next(b for b in self.sizes if b >= rows)
        inputs, held = self.held[bucket]
        host = self.host_inputs(plan, bucket)
        inputs[:, : host.shape[1]].copy_(host)  # columns past the plan's width: blocks past every row's length
        held.replay()
        self.replays += 1
        return held.output[:rows].clone() if self.rank == 0 else None

    def host_inputs(self, plan: StepPlan, bucket: int) -> torch.Tensor:
        """[bucket, 3 + plan's width]: each row's token, position, slot and block table; then the padded rows."""
        block_size = self.pool.block_size
        positions = plan.start_pos
        rows = torch.arange(positions.numel())
        slots = plan.block_tables[rows, positions // block_size] * block_size + positions % block_size
        real = torch.cat([torch.stack([plan.tokens, positions, slots], dim=1), plan.block_tables], dim=1)
        return torch.cat([real, self.padding(bucket - rows.numel(), real.shape[1])])

    def padding(self, rows: int, columns: int) -> torch.Tensor:
        """Inputs [rows, columns] of padded rows: token 0 at position 0 of the spare block, which no turn holds, over
        a table of the spare block alone (their logits are dropped)."""
        spare = self.pool.spare_block
        out = torch.full((rows, columns), spare, dtype=torch.long)
        out[:, :3] = torch.tensor([0, 0, spare * self.pool.block_size])
        return out

    def step_over(self, inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The decode step reading only `inputs` [B, 3 + width] (and the model and pool): its logits [B, V]."""
        bucket, device = inputs.shape[0], inputs.device
        span = torch.arange(self.width * self.pool.block_size, device=device)
        last = torch.arange(bucket, device=device)
        model, layers = self.model, self.pool.layers

        def step() -> torch.Tensor:
            positions = inputs[:, 1].contiguous()
            visible = span <= positions[:, None, None]
            table = inputs[:, 3:].contiguous()
            group = AttentionGroup(0, bucket, 1, table, visible, positions + 1, causal=False, first_block=None)
            batch = ForwardBatch(positions=positions, slots=inputs[:, 2].contiguous(), groups=[group], last=last)
            return model(inputs[:, 0].contiguous(), batch, layers, all_logits=False, logits_on_all_ranks=True)

        return step

    def warm_up(self) -> str:
        """Hold every bucket now (at start-up, on every rank: the steps hold the model's collectives), largest first,
        on rows of the spare block; a line saying how long each took and the memory the held steps took. Every
        bucket is warmed up before any is captured: the warm-ups are eager steps, which fail alike on every rank or
        not at all; a CUDA graph's capture runs no collective (NCCL puts them in the graph), so a rank whose capture
        fails leaves no other waiting."""
        steps = {}
        for bucket in reversed(self.sizes):
            inputs = self.padding(bucket, 3 + self.width).to(self.pool.device)
            steps[bucket] = inputs, self.step_over(inputs)
        start = time.perf_counter()
        for _, step in steps.values():
            self.capture.warm_up(step)
        warm = time.perf_counter() - start
        took = {}
        for bucket, (inputs, step) in steps.items():
            start = time.perf_counter()
            self.held[bucket] = inputs, self.capture.capture(step)
            took[bucket] = time.perf_counter() - start
        each = ", ".join(f"{b} ({took[b]:.2f} s)" for b in self.sizes)
        return (
            f"decode step held as {self.capture.name} for batches of {each} after {warm:.1f} s of warm-up; "
            f"their memory pool took {self.capture.pool_bytes() / 2**20:.0f} MiB"
        )


def prepare_on_every_rank(ctx: DistContext, runner: ModelRunner, make: Callable[[], object], failed: str) -> str:
    """make() the held decode steps (a DecodeGraphs or a CapturedDecode) on every rank, and where every rank could,
    warm_up() them (they hold the collectives); the runner uses them where every rank succeeded, else runs eager. The
    line for rank 0 to log: warm_up's, or `failed` with the first reason."""
    graphs, note, error = None, None, None
    for phase in ("make", "warm_up"):
        try:
            if phase == "make":
                graphs = make()
            else:
                note = graphs.warm_up()
        except Exception as e:  # a step that cannot be compiled or captured: the eager step serves
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not all(all_ranks_ok([error is None], ctx.world_size)):
            return f"{failed} ({error or 'another rank failed to'}); running eager"
    runner.use_graphs(graphs)
    return note
