"""The rank protocol. Rank 0 decides every step and broadcasts a small plan (new token ids, their rows' start
positions and block tables, block copies); every rank builds the same batch from it and runs the forward on its
shards over its part of the KV pool, which the runner allocates once; only rank 0 receives the logits. Shutdown and
errors are plans too, so a following rank always learns why it should stop."""

import enum
from dataclasses import dataclass

import torch

from tp_infer.distributed import DistContext, broadcast_plan
from tp_infer.kv.pool import CACHE_DTYPES, KVPool
from tp_infer.model.attention import MLA
from tp_infer.model.batch import AttentionGroup, ForwardBatch
from tp_infer.model.transformer import DTYPES, Transformer


class PlanKind(enum.IntEnum):
    FORWARD = 0
    SHUTDOWN = 1
    ABORT = 2


@dataclass
class StepPlan:
    """One forward. Row b feeds num_new[b] tokens (the next ones of the flat `tokens`) from position start_pos[b],
    over the blocks block_tables[b, :ceil((start_pos[b] + num_new[b]) / block_size)]. The block copies [C, 2]
    (source, destination) run first."""

    tokens: torch.Tensor  # [N] int64
    start_pos: torch.Tensor  # [B]
    num_new: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, W], padded with 0
    copies: torch.Tensor  # [C, 2]
    all_logits: bool = False  # logits of every token, not only of each row's last (tests)

    @classmethod
    def from_rows(
        cls, rows: list[tuple[list[int], int, list[int]]], copies: list[tuple[int, int]] = (), all_logits=False
    ) -> "StepPlan":
        """rows of (block table, start position, new token ids)."""
        width = max(len(blocks) for blocks, _, _ in rows)
        tables = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (blocks, _, _) in enumerate(rows):
            tables[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return cls(
            tokens=torch.tensor([t for _, _, ids in rows for t in ids], dtype=torch.long),
            start_pos=torch.tensor([pos for _, pos, _ in rows], dtype=torch.long),
            num_new=torch.tensor([len(ids) for _, _, ids in rows], dtype=torch.long),
            block_tables=tables,
            copies=torch.tensor(list(copies), dtype=torch.long).view(-1, 2),
            all_logits=all_logits,
        )


def build_batch(plan: StepPlan, block_size: int, device: torch.device) -> ForwardBatch:
    """The model's view of a plan: each new token's position and cache slot, and the attention groups (consecutive
    decode rows together, each longer row alone)."""
    starts, counts = plan.start_pos.tolist(), plan.num_new.tolist()
    tables = plan.block_tables.to(device)
    num_new = plan.num_new.to(device)
    first = torch.cumsum(num_new, 0) - num_new  # each row's first token in the stream
    row = torch.repeat_interleave(torch.arange(len(counts), device=device), num_new)
    positions = plan.start_pos.to(device)[row] + torch.arange(int(sum(counts)), device=device) - first[row]
    slots = tables[row, positions // block_size] * block_size + positions % block_size
    groups, b, start = [], 0, 0
    while b < len(counts):
        end, width = b + 1, counts[b]
        while width == 1 and end < len(counts) and counts[end] == 1:
            end += 1
        nb = -(-max(s + n for s, n in zip(starts[b:end], counts[b:end], strict=True)) // block_size)
        group_positions = positions[start : start + (end - b) * width].view(end - b, width)
        visible = torch.arange(nb * block_size, device=device) <= group_positions[:, :, None]
        groups.append(AttentionGroup(start, end - b, width, tables[b:end, :nb], visible))
        b, start = end, start + (end - b) * width
    return ForwardBatch(positions=positions, slots=slots, groups=groups, last=first + num_new - 1)


class RemoteAbort(RuntimeError):
    """Rank 0 gave up; the message says why."""


class ModelRunner:
    """Runs the model in lockstep on all ranks: rank 0 calls forward(), the others sit in follow(). Holds this
    rank's KV pool: num_blocks blocks of block_size tokens per layer."""

    def __init__(self, model: Transformer, ctx: DistContext, num_blocks: int, block_size: int = 16):
        self.model, self.ctx = model, ctx
        args = model.args
        cache_dtype = CACHE_DTYPES.get(args.kv_cache_dtype, DTYPES[args.dtype])
        shapes = MLA.cache_shapes(args, ctx.world_size)
        self.pool = KVPool(args.n_layers, num_blocks, block_size, shapes, cache_dtype, ctx.device)

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Rank 0: broadcast the plan, run it, return the logits [B, V] (fp32, on the CPU)."""
        self._send(PlanKind.FORWARD, plan)
        return self.execute(plan).cpu()

    def shutdown(self) -> None:
        """Rank 0: release the followers, which return from follow()."""
        self._send(PlanKind.SHUTDOWN)

    def abort(self, reason: str) -> None:
        """Rank 0: tell the followers to stop with an error naming `reason`."""
        self._send(PlanKind.ABORT, reason=reason)

    def follow(self) -> None:
        """Other ranks: execute rank 0's plans until shutdown (returns) or abort (raises RemoteAbort)."""
        while True:
            kind, sizes, payload = self._receive()
            if kind == PlanKind.SHUTDOWN:
                return
            if kind == PlanKind.ABORT:
                raise RemoteAbort(bytes(payload.tolist()).decode(errors="replace"))
            rows, tokens, width, copies, all_logits = sizes
            start_pos, num_new, ids, tables, pairs = payload.split([rows, rows, tokens, rows * width, 2 * copies])
            plan = StepPlan(ids, start_pos, num_new, tables.view(rows, width), pairs.view(copies, 2), bool(all_logits))
            self.execute(plan)

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run a plan on this rank alone (every rank must run the same one); rank 0 gets the logits."""
        device = self.ctx.device
        if plan.copies.numel():
            copies = plan.copies.to(device)
            self.pool.copy(copies[:, 0], copies[:, 1])
        batch = build_batch(plan, self.pool.block_size, device)
        return self.model(
            plan.tokens.to(device), batch, self.pool.layers, all_logits=plan.all_logits, logits_on_all_ranks=False
        )

    # Wire format: a header [kind, rows, tokens, table width, copies, all_logits, payload length], then one int64
    # payload: start positions, token counts, token ids, block tables, copies.
    def _send(self, kind: PlanKind, plan: StepPlan | None = None, reason: str = "") -> None:
        if self.ctx.world_size == 1:
            return
        if plan is not None:
            payload = torch.cat(
                [plan.start_pos, plan.num_new, plan.tokens, plan.block_tables.flatten(), plan.copies.flatten()]
            )
            rows, width = plan.block_tables.shape
            sizes = [rows, plan.tokens.numel(), width, plan.copies.shape[0], int(plan.all_logits)]
        else:
            payload = torch.tensor(list(reason.encode()), dtype=torch.long)
            sizes = [0] * 5
        header = torch.tensor([int(kind), *sizes, payload.numel()], dtype=torch.long)
        self._broadcast(header)
        if payload.numel():
            self._broadcast(payload)

    def _receive(self) -> tuple[PlanKind, list[int], torch.Tensor]:
        kind, *sizes, length = self._broadcast(torch.empty(7, dtype=torch.long)).tolist()
        payload = self._broadcast(torch.empty(length, dtype=torch.long)) if length else torch.empty(0, dtype=torch.long)
        return PlanKind(kind), sizes, payload

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast_plan(tensor, self.ctx.rank)
