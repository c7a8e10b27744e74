"""Process group set-up from torchrun's environment (NCCL with CUDA, gloo otherwise), and small collectives."""

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU, or with fewer GPUs than this node's ranks (NCCL takes
    one GPU per rank), is refused with one line, the same on every rank of the node."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r}: must be auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise ValueError(
            f"--device {device}: {local_world_size} ranks on this node but {gpus} GPU{'s' if gpus > 1 else ''} "
            "(one each): start fewer ranks per node, or use --device cpu"
        )
    return torch.device("cuda", local_rank)


# rank 0's plans and start-up agreement travel on their own gloo group with no practical deadline: a follower may
# wait for the next plan as long as the console's user thinks, and ranks may finish loading minutes apart
CONTROL_TIMEOUT = timedelta(days=30)
_control_group = None
_collective_timeout_s = 20.0


def init_distributed(device: str = "auto", collective_timeout_s: float = 20.0) -> DistContext:
    """Join the torchrun job described by the environment; without torchrun, run as a world of one. The model's
    collectives, and rank 0's sending of plans, time out after collective_timeout_s, so a hung rank ends the job
    instead of stalling it."""
    global _control_group, _collective_timeout_s
    _collective_timeout_s = collective_timeout_s
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(seconds=collective_timeout_s), device_id=dev if backend == "nccl" else None
        )
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return DistContext(rank, world_size, dev)


def control_group():
    """The CPU (gloo) group for plans and agreement; the model's collectives use the default group."""
    return _control_group


class CollectiveError(RuntimeError):
    """A collective failed because another rank did not take part in time (timeout_s set) or its connection closed.
    A symptom, not a cause: the failure report finds the rank responsible."""

    def __init__(self, op: str, timeout_s: float | None, detail: str):
        self.op, self.timeout_s, self.detail = op, timeout_s, detail
        super().__init__(f"{op}: no answer within {timeout_s:g} s" if timeout_s is not None else f"{op}: {detail}")


@contextlib.contextmanager
def collective(op: str, deadline_s: float | None) -> Iterator[None]:
    """Turn a failure of the collective `op` into CollectiveError. gloo raises a plain RuntimeError both for a
    timeout and for a closed connection; a failure after deadline_s (None: no deadline) is the timeout."""
    start = time.monotonic()
    try:
        yield
    except RuntimeError as e:
        timed_out = deadline_s is not None and time.monotonic() - start >= deadline_s
        raise CollectiveError(op, deadline_s if timed_out else None, _first_line(e)) from e


def _first_line(error: Exception) -> str:
    """gloo's message without its source location: "[.../pair.cc:534] Connection closed by peer" -> the rest."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__


def broadcast_plan(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank 0's tensor to every rank, on the control group. Rank 0 waits at most the collective timeout for every
    rank to take it (gloo's sender waits for each receiver), so a stuck follower cannot hold the job; the others wait
    without limit, since rank 0 may be waiting for the console's user."""
    deadline_s = _collective_timeout_s if rank == 0 else None
    with collective("plan broadcast", deadline_s):
        wait(dist.broadcast(tensor, src=0, group=_control_group, async_op=True), deadline_s)
    return tensor


def wait(work, deadline_s: float | None) -> None:
    """Wait for an asynchronous collective, without limit or until deadline_s (then it raises)."""
    if deadline_s is None:
        work.wait()
    else:
        work.wait(timedelta(seconds=deadline_s))


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of every rank's x, on every rank (in place, except in a compiled step, whose graph holds the
    functional collective: torch.compile traces it; the default group's timeout bounds it there)."""
    if world_size == 1:
        return x
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", dist.group.WORLD)
    with collective("all_reduce", _collective_timeout_s):
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension, on every rank."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    with collective("all_gather", _collective_timeout_s):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def gather_last_dim(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor | None:
    """Concatenate every rank's x along the last dimension on rank 0 only; other ranks get None."""
    if world_size == 1:
        return x
    if torch.compiler.is_compiling():  # a compiled step: gathered on every rank, by the functional collective
        parts = funcol.all_gather_tensor(x.contiguous(), 0, dist.group.WORLD).chunk(world_size)
        return torch.cat(parts, dim=-1) if rank == 0 else None
    parts = [torch.empty_like(x) for _ in range(world_size)] if rank == 0 else None
    with collective("gather", _collective_timeout_s):
        dist.gather(x.contiguous(), parts, dst=0)
    return torch.cat(parts, dim=-1) if rank == 0 else None


class StartupError(RuntimeError):
    """Some rank could not start; raised on every rank with the first failing rank's message."""


def agree(error: str | None, world_size: int) -> None:
    """Collective: every rank passes its own error (or None); if any rank failed, all raise the first failure.
    Used wherever one rank may fail alone, so that no other rank is left waiting in a later collective."""
    errors = [error]
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error, group=_control_group)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise StartupError(message if world_size == 1 or message.startswith("rank ") else f"rank {rank}: {message}")


def all_ranks_ok(flags: list[bool], world_size: int) -> list[bool]:
    """Each flag and-ed over every rank, on every rank (control group; rank 0 waits at most the collective
    timeout, as for plans)."""
    tensor = torch.tensor(flags, dtype=torch.long)
    if world_size > 1:
        deadline_s = _collective_timeout_s if dist.get_rank() == 0 else None
        with collective("agreement", deadline_s):
            wait(dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_control_group, async_op=True), deadline_s)
    return [bool(v) for v in tensor.tolist()]


def min_over_ranks(value: int, world_size: int) -> int:
    """The smallest of every rank's value, on every rank (on the control group)."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_control_group)
    return int(tensor)
