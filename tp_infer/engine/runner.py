"""The rank protocol. Rank 0 decides every step and broadcasts a small plan (kind, slots, new token ids, start
positions); every rank runs the forward on its shards; only rank 0 receives the logits. Shutdown and errors are
plans too, so a following rank always learns why it should stop."""

import enum
from dataclasses import dataclass

import torch

from tp_infer.distributed import DistContext, broadcast_plan
from tp_infer.model.transformer import Transformer


class PlanKind(enum.IntEnum):
    FORWARD = 0
    SHUTDOWN = 1
    ABORT = 2


@dataclass
class StepPlan:
    """One forward: row b feeds tokens[b, :num_new[b]] into slot slots[b] from position start_pos[b]."""

    tokens: torch.Tensor  # [B, T] int64, padded
    start_pos: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    num_new: torch.Tensor  # [B]

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, list[int]]]) -> "StepPlan":
        """rows of (slot, start position, token ids)."""
        width = max(len(ids) for _, _, ids in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (_, _, ids) in enumerate(rows):
            tokens[b, : len(ids)] = torch.tensor(ids)
        return cls(
            tokens=tokens,
            start_pos=torch.tensor([pos for _, pos, _ in rows]),
            slots=torch.tensor([slot for slot, _, _ in rows]),
            num_new=torch.tensor([len(ids) for _, _, ids in rows]),
        )


class RemoteAbort(RuntimeError):
    """Rank 0 gave up; the message says why."""


class ModelRunner:
    """Runs the model in lockstep on all ranks: rank 0 calls forward(), the others sit in follow()."""

    def __init__(self, model: Transformer, ctx: DistContext):
        self.model, self.ctx = model, ctx

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Rank 0: broadcast the plan, run it, return the last-token logits [B, V] (fp32, on the CPU)."""
        self._send(PlanKind.FORWARD, plan)
        return self._run(plan).cpu()

    def shutdown(self) -> None:
        """Rank 0: release the followers, which return from follow()."""
        self._send(PlanKind.SHUTDOWN)

    def abort(self, reason: str) -> None:
        """Rank 0: tell the followers to stop with an error naming `reason`."""
        self._send(PlanKind.ABORT, reason=reason)

    def follow(self) -> None:
        """Other ranks: execute rank 0's plans until shutdown (returns) or abort (raises RemoteAbort)."""
        while True:
            kind, rows, width, payload = self._receive()
            if kind == PlanKind.SHUTDOWN:
                return
            if kind == PlanKind.ABORT:
                raise RemoteAbort(bytes(payload.tolist()).decode(errors="replace"))
            start_pos, slots, num_new, tokens = payload.split([rows, rows, rows, rows * width])
            self._run(StepPlan(tokens.view(rows, width), start_pos, slots, num_new))

    def _run(self, plan: StepPlan) -> torch.Tensor | None:
        device = self.ctx.device
        return self.model(
            plan.tokens.to(device),
            plan.start_pos.to(device),
            plan.slots.to(device),
            plan.num_new.to(device),
            logits_on_all_ranks=False,
        )

    # Wire format: a header [kind, rows, width, payload length], then one int64 payload.
    def _send(self, kind: PlanKind, plan: StepPlan | None = None, reason: str = "") -> None:
        if self.ctx.world_size == 1:
            return
        if plan is not None:
            payload = torch.cat([plan.start_pos, plan.slots, plan.num_new, plan.tokens.flatten()])
            rows, width = plan.tokens.shape
        else:
            payload = torch.tensor(list(reason.encode()), dtype=torch.long)
            rows = width = 0
        header = torch.tensor([int(kind), rows, width, payload.numel()], dtype=torch.long)
        self._broadcast(header)
        if payload.numel():
            self._broadcast(payload)

    def _receive(self) -> tuple[PlanKind, int, int, torch.Tensor]:
        kind, rows, width, length = self._broadcast(torch.empty(4, dtype=torch.long)).tolist()
        payload = self._broadcast(torch.empty(length, dtype=torch.long)) if length else torch.empty(0, dtype=torch.long)
        return PlanKind(kind), rows, width, payload

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast_plan(tensor, self.ctx.rank)
