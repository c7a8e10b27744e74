"""The real command line in processes of its own, for tests of whole jobs: torchrun commands, the ranks' process
ids, and checks that nothing a job started outlives it."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LIMIT = 60  # seconds: a failing job must be over by then, on every rank


def torchrun(world_size: int, *args: str, script: str | None = None) -> list[str]:
    entry = [script] if script else ["-m", "tp_infer.generate"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        *entry,
        *args,
    ]


def descendants(pid: int) -> set[int]:
    """Every process started from pid, however detached (torchrun puts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def run_job(cmd: list[str], stdin: str = "", env=None, limit: float = LIMIT) -> tuple[int, str, str, float]:
    """Run cmd; returns (exit status, stdout, stderr, seconds). Fails if it or any process it started is still
    alive after `limit` seconds."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env or ENV, cwd=REPO)
        proc.stdin.write(stdin)
        proc.stdin.close()
        seen: set[int] = set()
        while proc.poll() is None and time.monotonic() - start < limit:
            seen |= descendants(proc.pid)
            time.sleep(0.2)
        if proc.poll() is None:
            kill_all({proc.pid, *seen, *descendants(proc.pid)})
            pytest.fail(f"still running after {limit} s: {' '.join(cmd)}")
        elapsed = time.monotonic() - start
        assert_gone(seen)
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), elapsed


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_gone(pids: set[int], grace: float = 5.0) -> None:
    """None of the job's processes survives it (a follower left waiting would)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [
            p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
        ]
        if not alive:
            return
        time.sleep(0.1)
    kill_all(pids)
    pytest.fail(f"processes {alive} outlived the job")


def rank_pids(torchrun_pid: int, world_size: int, limit: float = 60) -> dict[int, int]:
    """The workers' pids by rank, read from their environment."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ranks = {}
        for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = int(child)
        if len(ranks) == world_size:
            return ranks
        time.sleep(0.1)
    pytest.fail("the ranks did not start")
