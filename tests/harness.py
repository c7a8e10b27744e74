"""Run a function on N ranks in real separate processes joined by gloo, the way torchrun would."""

import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable

import torch

# TP_INFER_TEST_DEVICE=cuda runs the suite's world-size-1 work on the GPU (harness jobs and the command lines that
# take device_option); larger worlds stay on gloo and the CPU, which needs no GPU per rank
TEST_DEVICE = os.environ.get("TP_INFER_TEST_DEVICE", "cpu")


def device_for(world_size: int) -> str:
    return TEST_DEVICE if world_size == 1 else "cpu"


def device_option(world_size: int) -> list[str]:
    """The command line's --device for a job of world_size ranks."""
    return ["--device", device_for(world_size)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    from tp_infer.distributed import init_distributed

    try:
        ctx = init_distributed(device_for(world_size))
        buffer = io.BytesIO()  # tensors travel as bytes: shared-memory handles die with the process
        torch.save(target(ctx, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as e:  # report everything, the parent re-raises
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(world_size: int, target: Callable, *args, timeout: float = 300) -> list:
    """target(ctx, *args) on every rank; returns the results by rank (tensors on the CPU), or raises with the failing
    ranks' errors. Fails (rather than hangs) if any rank is still running after `timeout` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world_size, port, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in procs:
            rank, status, value = results.get(timeout=timeout)
            outcomes[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
    if errors:
        raise RankError(errors)
    return [torch.load(io.BytesIO(outcomes[r][1]), map_location="cpu") for r in range(world_size)]


class RankError(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
