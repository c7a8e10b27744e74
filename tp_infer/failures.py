"""How a failure on any rank becomes one line from rank 0. A follower that fails leaves a report in the job's store
(held by the torchrun agent, so it outlives the ranks) and exits at once, which breaks its peers' collectives too:
a cause (its own exception) or a symptom (a collective failed under it). Rank 0, when a collective fails under it,
collects the reports for a moment and names the first cause; without one, the ranks that left no report are the
ones that died or stopped answering."""

import contextlib
import json
import signal
import time

import click
import torch.distributed as dist

from tp_infer.distributed import CollectiveError, DistContext

REPORT_KEY = "tp_infer/failure/{rank}"
# How long rank 0 waits for the followers' reports: a failure reaches every live rank within moments, as each rank
# that notices it exits and breaks its peers' collectives in turn. A rank that never reports costs the whole wait.
REPORT_WAIT_S = 3.0


def report_failure(ctx: DistContext, error: Exception) -> None:
    """Print, on stderr, the line that says which rank failed and how. A follower prints only its own cause (a
    symptom is rank 0's to explain) and leaves its report for rank 0."""
    own = describe(ctx.rank, error)
    if ctx.world_size == 1:
        click.echo(f"Error: {own}", err=True)
    elif ctx.rank != 0:
        publish(ctx.rank, error, own)
        if not isinstance(error, CollectiveError):
            click.echo(f"Error: {own}", err=True)
    else:
        # torchrun stops every rank with SIGTERM as soon as one exits: let rank 0 finish saying why
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        click.echo(f"Error: {verdict(ctx.world_size, error, own)}", err=True)


def describe(rank: int, error: Exception) -> str:
    if isinstance(error, CollectiveError):
        return f"rank {rank}: {error}"
    text = str(error).strip()
    return f"rank {rank}: {type(error).__name__}: {text.splitlines()[0] if text else ''}"


def publish(rank: int, error: Exception, line: str) -> None:
    report = {"cause": not isinstance(error, CollectiveError), "line": line}
    if isinstance(error, CollectiveError) and error.timeout_s is not None:
        report.update(op=error.op, timeout_s=error.timeout_s)
    with contextlib.suppress(Exception):  # best effort: the store may be gone too, and the failure must not be masked
        dist.distributed_c10d._get_default_store().set(REPORT_KEY.format(rank=rank), json.dumps(report))


def verdict(world_size: int, error: Exception, own: str) -> str:
    """Rank 0's line: its own failure, a follower's cause, or the ranks that left no report."""
    if not isinstance(error, CollectiveError):
        return own
    reports = collect(world_size, REPORT_WAIT_S)
    causes = [r["line"] for _, r in sorted(reports.items()) if r["cause"]]
    if causes:
        return causes[0]
    silent = [rank for rank in range(1, world_size) if rank not in reports]
    if not silent:
        return own
    who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
    # a timeout anywhere means a rank was stuck; another rank's exit may have broken rank 0's own collective first
    timeouts = [(error.op, error.timeout_s)] if error.timeout_s is not None else []
    timeouts += [(r["op"], r["timeout_s"]) for r in reports.values() if "timeout_s" in r]
    if timeouts:
        op, timeout_s = timeouts[0]
        return f"{who}: no answer within {timeout_s:g} s in {op}"
    return f"{who}: lost during {error.op} (the process ended or cannot be reached)"


def collect(world_size: int, wait_s: float) -> dict[int, dict]:
    """The followers' reports by rank, waiting up to wait_s until every follower reported or one names a cause."""
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + wait_s
    with contextlib.suppress(Exception):  # no store: no reports
        store = dist.distributed_c10d._get_default_store()
        while True:
            for rank in range(1, world_size):
                key = REPORT_KEY.format(rank=rank)
                if rank not in reports and store.check([key]):
                    reports[rank] = json.loads(store.get(key))
            done = len(reports) == world_size - 1 or any(r["cause"] for r in reports.values())
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return reports
