"""Decode steps compiled whole: the torch backend's forward of a decode batch under torch.compile(fullgraph=True),
one graph per batch bucket (powers of two up to the largest batch), each compiled at start-up. On CUDA, with
cuda_graphs, each bucket's graph is also captured as a CUDA graph (torch.compile's "reduce-overhead" mode) and
replayed. A decode step of R rows runs in the smallest bucket B >= R: its rows are padded with B - R rows that write
the pool's spare block, which no turn holds, and whose logits are dropped; the block tables' width is a dynamic
dimension, so a growing history does not recompile. Steps that are not decode alone (a prefill or an extend in the
step, logits of every token) run eager."""

import time
from dataclasses import replace

import torch

from tp_infer.engine.runner import StepPlan, build_batch
from tp_infer.kv.pool import KVPool
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
