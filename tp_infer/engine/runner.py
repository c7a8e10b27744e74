"""The rank protocol. Rank 0 decides every step and broadcasts a small plan (new token ids, their rows' start
positions and block tables, block copies, moves between the tiers); every rank builds the same batch from it and
runs the forward on its shards over its part of the KV pool, which the runner allocates once (with the host tier,
when there is one); only rank 0 receives the logits. Shutdown and errors are plans too, so a following rank always
learns why it should stop."""

import contextlib
import enum
import struct
from dataclasses import dataclass

import torch

from tp_infer.distributed import DistContext, all_ranks_ok, broadcast_plan, collective
from tp_infer.kv.disk import DiskFiles
from tp_infer.kv.pool import KVPool
from tp_infer.kv.tiers import Transfer
from tp_infer.malloc import keep_freed_memory
from tp_infer.model.attention import cache_layout
from tp_infer.model.batch import AttentionGroup, ForwardBatch
from tp_infer.model.transformer import Transformer


class PlanKind(enum.IntEnum):
    FORWARD = 0
    SHUTDOWN = 1
    ABORT = 2


def key_to_ints(key: bytes) -> tuple[int, int]:
    return struct.unpack("<qq", key)


def ints_to_key(a: int, b: int) -> bytes:
    return struct.pack("<qq", a, b)


@dataclass
class StepPlan:
    """One forward. Row b feeds num_new[b] tokens (the next ones of the flat `tokens`) from position start_pos[b],
    over the blocks block_tables[b, :ceil((start_pos[b] + num_new[b]) / block_size)]. First the tier transfers
    [T, 5] (op, a, b, key as two int64; tiers.Transfer) run in order, then the block copies [C, 2] (source,
    destination). A plan may have no rows: transfers only."""

    tokens: torch.Tensor  # [N] int64
    start_pos: torch.Tensor  # [B]
    num_new: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, W], padded with 0
    copies: torch.Tensor  # [C, 2]
    transfers: torch.Tensor  # [T, 5]
    all_logits: bool = False  # logits of every token, not only of each row's last (tests)

    @classmethod
    def from_rows(
        cls,
        rows: list[tuple[list[int], int, list[int]]],
        copies: list[tuple[int, int]] = (),
        transfers: list[tuple[Transfer, int, int, bytes]] = (),
        all_logits=False,
    ) -> "StepPlan":
        """rows of (block table, start position, new token ids); transfers as the block manager lists them."""
        width = max((len(blocks) for blocks, _, _ in rows), default=0)
        tables = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (blocks, _, _) in enumerate(rows):
            tables[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return cls(
            tokens=torch.tensor([t for _, _, ids in rows for t in ids], dtype=torch.long),
            start_pos=torch.tensor([pos for _, pos, _ in rows], dtype=torch.long),
            num_new=torch.tensor([len(ids) for _, _, ids in rows], dtype=torch.long),
            block_tables=tables,
            copies=torch.tensor(list(copies), dtype=torch.long).view(-1, 2),
            transfers=torch.tensor(
                [(int(op), a, b, *key_to_ints(key)) for op, a, b, key in transfers], dtype=torch.long
            ).view(-1, 5),
            all_logits=all_logits,
        )


def build_batch(plan: StepPlan, block_size: int, device: torch.device) -> ForwardBatch:
    """The model's view of a plan: each new token's position and cache slot, and the attention groups (consecutive
    decode rows together, each longer row alone)."""
    starts, counts = plan.start_pos.tolist(), plan.num_new.tolist()
    # positions and slots are worked out where the plan is (the host), then copied over: nothing on the device is
    # read back to size a tensor
    first = torch.cumsum(plan.num_new, 0) - plan.num_new  # each row's first token in the stream
    row = torch.repeat_interleave(torch.arange(len(counts)), plan.num_new, output_size=sum(counts))
    positions = plan.start_pos[row] + torch.arange(sum(counts)) - first[row]
    slots = plan.block_tables[row, positions // block_size] * block_size + positions % block_size
    tables = plan.block_tables.to(device)
    last = (first + plan.num_new - 1).to(device)
    positions, slots = positions.to(device), slots.to(device)
    groups, b, start = [], 0, 0
    while b < len(counts):
        end, width = b + 1, counts[b]
        while width == 1 and end < len(counts) and counts[end] == 1:
            end += 1
        nb = -(-max(s + n for s, n in zip(starts[b:end], counts[b:end], strict=True)) // block_size)
        group_positions = positions[start : start + (end - b) * width].view(end - b, width)
        visible = torch.arange(nb * block_size, device=device) <= group_positions[:, :, None]
        causal = not any(starts[b:end])
        run = consecutive_from(plan.block_tables[b, :nb].tolist()) if end == b + 1 else None
        lengths = group_positions[:, -1] + 1
        groups.append(AttentionGroup(start, end - b, width, tables[b:end, :nb], visible, lengths, causal, run))
        b, start = end, start + (end - b) * width
    return ForwardBatch(positions=positions, slots=slots, groups=groups, last=last)


def copies_together(moves: list[list[int]]) -> list[tuple[Transfer, list[int], list[int], bytes]]:
    """Tier transfers [op, a, b, key as two ints] in order as (op, [a...], [b...], key), consecutive moves of blocks
    the same way (DEMOTE or PROMOTE) joined into one while their destinations differ, which gives what copying them
    one by one gives: a run's sources and destinations lie in different pools."""
    out: list[tuple[Transfer, list[int], list[int], bytes]] = []
    written: set[int] = set()  # the destinations of the last run
    for op, a, b, k0, k1 in moves:
        op = Transfer(op)
        if op in (Transfer.DEMOTE, Transfer.PROMOTE) and out and out[-1][0] == op and b not in written:
            out[-1][1].append(a)
            out[-1][2].append(b)
        else:
            out.append((op, [a], [b], ints_to_key(k0, k1)))
            written.clear()
        written.add(b)
    return out


def consecutive_from(blocks: list[int]) -> int | None:
    """The first block of a run of consecutive blocks (as a conversation allocated at once holds them), else None."""
    return blocks[0] if blocks == list(range(blocks[0], blocks[0] + len(blocks))) else None


class RemoteAbort(RuntimeError):
    """Rank 0 gave up; the message says why."""


class ModelRunner:
    """Runs the model in lockstep on all ranks: rank 0 calls forward(), the others sit in follow(). Holds this
    rank's KV pool, num_blocks blocks of block_size tokens per layer, and the tiers under it: host_blocks more in
    host memory, and the disk tier's files."""

    def __init__(
        self,
        model: Transformer,
        ctx: DistContext,
        num_blocks: int,
        block_size: int = 16,
        host_blocks: int = 0,
        disk: DiskFiles | None = None,
        spare_blocks: int = 0,
    ):
        """spare_blocks: blocks allocated past num_blocks for scratch (the padded rows of a held decode step)."""
        self.model, self.ctx, self.disk = model, ctx, disk
        if ctx.device.type == "cpu":
            keep_freed_memory()  # every step's activations would otherwise arrive as fresh pages
        layout = cache_layout(model.args, ctx.world_size)
        self.pool = KVPool.of(layout, num_blocks, block_size, ctx.device, spare=spare_blocks)
        self.graphs = None  # held decode steps (tp_infer.engine.graphs) once use_graphs() gives them
        on_gpu = ctx.device.type == "cuda"
        self.host = KVPool.of(layout, host_blocks, block_size, torch.device("cpu"), on_gpu) if host_blocks else None
        self.side_stream = torch.cuda.Stream(ctx.device) if on_gpu and host_blocks else None

    def use_graphs(self, graphs) -> None:
        """Run the decode steps that `graphs` takes (a DecodeGraphs or CapturedDecode over this runner's model and pool)
        through it from now on."""
        self.graphs = graphs

    def forward(self, plan: StepPlan) -> torch.Tensor | None:
        """Rank 0: broadcast the plan, run it, return the logits [B, V] (fp32, on the CPU; None without rows)."""
        self._send(PlanKind.FORWARD, plan)
        logits, _ = self.execute(plan)
        return None if logits is None else logits.cpu()

    def load(self, plan: StepPlan) -> list[bool]:
        """Rank 0: run a plan of transfers (no rows) on every rank; for each LOAD, whether every rank could read its
        file."""
        self._send(PlanKind.FORWARD, plan)
        return self.execute(plan)[1]

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
            rows, tokens, width, copies, transfers, all_logits = sizes
            parts = payload.split([rows, rows, tokens, rows * width, 2 * copies, 5 * transfers])
            start_pos, num_new, ids, tables, pairs, moves = parts
            plan = StepPlan(
                ids, start_pos, num_new, tables.view(rows, width), pairs.view(copies, 2), moves.view(transfers, 5)
            )
            plan.all_logits = bool(all_logits)
            self.execute(plan)

    def execute(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[bool]]:
        """Run a plan on this rank alone (every rank must run the same one): rank 0 gets the logits (None without
        rows) and, for each LOAD, whether every rank read its file."""
        device = self.ctx.device
        loaded = self.transfer(plan.transfers.tolist()) if plan.transfers.numel() else []
        if plan.copies.numel():
            copies = plan.copies.to(device)
            self.pool.copy(copies[:, 0], copies[:, 1])
        if not plan.num_new.numel():
            return None, loaded
        if self.graphs is not None and self.graphs.takes(plan):
            with collective("held decode step", None):  # its collectives' failures, named as the eager ones are
                return self.graphs.run(plan), loaded
        batch = build_batch(plan, self.pool.block_size, device)
        logits = self.model(
            plan.tokens.to(device), batch, self.pool.layers, all_logits=plan.all_logits, logits_on_all_ranks=False
        )
        return logits, loaded

    def transfer(self, moves: list[list[int]]) -> list[bool]:
        """Run tier transfers in order. Between the GPU and pinned host memory the copies go on a side stream that
        the forward waits for; files are read and written once those copies are done."""
        stream = self.side_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
        loaded = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for op, sources, destinations, key in copies_together(moves):
                a, b = sources[0], destinations[0]
                if op in (Transfer.SAVE_HOST, Transfer.SAVE_POOL, Transfer.LOAD) and stream is not None:
                    stream.synchronize()  # the host memory read or written below must be settled
                if op == Transfer.DEMOTE:
                    self.pool.copy_to(self.host, sources, destinations)
                elif op == Transfer.PROMOTE:
                    self.host.copy_to(self.pool, sources, destinations)
                elif op == Transfer.SAVE_HOST:
                    self.disk.save(key, self.host.block(a))
                elif op == Transfer.SAVE_POOL:
                    self.disk.save(key, self.pool.block(a))
                elif op == Transfer.LOAD:
                    tensors = self.disk.load(key, self.host.layout())
                    if tensors is not None:
                        for name, part in self.host.block(b).items():
                            part.copy_(tensors[name])
                    loaded.append(tensors is not None)
                elif op == Transfer.DELETE:
                    self.disk.delete(key)
        if stream is not None:
            torch.cuda.current_stream(self.ctx.device).wait_stream(stream)
        return all_ranks_ok(loaded, self.ctx.world_size) if loaded else []

    # Wire format: a header [kind, rows, tokens, table width, copies, transfers, all_logits, payload length], then
    # one int64 payload: start positions, token counts, token ids, block tables, copies, transfers.
    def _send(self, kind: PlanKind, plan: StepPlan | None = None, reason: str = "") -> None:
        if self.ctx.world_size == 1:
            return
        if plan is not None:
            tables, copies, moves = plan.block_tables.flatten(), plan.copies.flatten(), plan.transfers.flatten()
            payload = torch.cat([plan.start_pos, plan.num_new, plan.tokens, tables, copies, moves])
            rows, width = plan.block_tables.shape
            sizes = [rows, plan.tokens.numel(), width, plan.copies.shape[0], plan.transfers.shape[0]]
            sizes.append(int(plan.all_logits))
        else:
            payload = torch.tensor(list(reason.encode()), dtype=torch.long)
            sizes = [0] * 6
        header = torch.tensor([int(kind), *sizes, payload.numel()], dtype=torch.long)
        self._broadcast(header)
        if payload.numel():
            self._broadcast(payload)

    def _receive(self) -> tuple[PlanKind, list[int], torch.Tensor]:
        kind, *sizes, length = self._broadcast(torch.empty(8, dtype=torch.long)).tolist()
        payload = self._broadcast(torch.empty(length, dtype=torch.long)) if length else torch.empty(0, dtype=torch.long)
        return PlanKind(kind), sizes, payload

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast_plan(tensor, self.ctx.rank)
