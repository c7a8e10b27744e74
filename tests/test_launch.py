"""The launch scripts (launch/) end to end on this machine, on the CPU: two torchrun "nodes" against one node, and
the SLURM batch scripts run by bash under a fake SLURM (srun, scontrol and the documented variables), requeue
included. Every process is started with a timeout, so that a broken rendezvous fails the test rather than hangs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
OPTS = ["--max-seq-len", "256", "--max-batch-size", "2", "--dtype", "fp32", "--device", "cpu"]
SMALL = [*OPTS, "--max-new-tokens", "6"]
CONVERSATIONS = [
    {"id": "a", "turns": ["Hello", "how are you?"]},
    {"id": "b", "prompt_token_ids": [5, 6, 7]},
    {"id": 3, "turns": ["Tell me a story"]},
    {"id": "d", "prompt_token_ids": [9, 10, 11, 12]},
]
# long enough (every reply 20 tokens) that a signal sent once the first line is written finds the job running
LONG_JOB = [{"id": f"p{i}", "prompt_token_ids": [5 + i, 6, 7]} for i in range(12)]
LONG = [*OPTS, "--max-new-tokens", "20", "--ignore-eos"]
TIMEOUT_S = 120
JOB_ID = "4242"

FAKE_SRUN = '''#!{python}
"""Fake srun: runs its command once per node of the job, all on this machine, as SLURM would with
--ntasks-per-node=1; forwards SIGTERM/SIGINT to them; with --kill-on-bad-exit=1 stops the others when one fails.
The launch scripts write every srun option as --name=value."""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(opts) + "\\n")
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = []
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0", SLURM_STEP_ID="0")
    tasks.append(subprocess.Popen(args, env=env))

def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
status, running = 0, set(range(nodes))
while running:
    for i in sorted(running):
        rc = tasks[i].poll()
        if rc is None:
            continue
        running.discard(i)
        if rc != 0:
            status = status or (rc if rc > 0 else 128 - rc)
            if "--kill-on-bad-exit=1" in opts:
                for j in running:
                    tasks[j].terminate()
    time.sleep(0.05)
sys.exit(status)
'''

FAKE_SCONTROL = """#!/bin/sh
# Fake scontrol: `show hostnames LIST` prints one loopback address per node of the job; `requeue ID` succeeds.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1 $2" in
"show hostnames")
    i=0
    while [ "$i" -lt "$SLURM_JOB_NUM_NODES" ]; do echo 127.0.0.1; i=$((i + 1)); done ;;
"requeue $SLURM_JOB_ID") ;;
*) echo "fake scontrol: unsupported: $*" >&2; exit 1 ;;
esac
"""


# ---- helpers --------------------------------------------------------------------------------------------------
def base_env(tmp_path: Path) -> dict:
    """This environment without anything of an enclosing torchrun or SLURM job."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SRUN_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, TMPDIR=str(tmp_path))
    return env


def slurm_env(tmp_path: Path, nodes: int, gpus_on_node: int, **extra: str) -> dict:
    """A batch job's environment as SLURM documents it, with fake srun and scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "srun").write_text(FAKE_SRUN.replace("{python}", sys.executable))
        (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
        for tool in bin_dir.iterdir():
            tool.chmod(0o755)
    env = base_env(tmp_path)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=f"node[0-{nodes - 1}]" if nodes > 1 else "node0",
        SLURM_GPUS_ON_NODE=str(gpus_on_node),  # the number of ranks per node, here on the CPU
        RDZV_PORT=str(free_port()),
        **extra,
    )
    return env


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def start(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([str(c) for c in cmd], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> int:
    """proc's exit status; if it runs past timeout, it is stopped (SIGTERM, which torchrun passes to its workers,
    then SIGKILL) and the test fails."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pytest.fail(f"{proc.args[:4]} still running after {timeout} s; log:\n{tail(log)}")


def run(cmd: list, env: dict, log: Path) -> int:
    return finish(start(cmd, env, log), log)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def results(path: Path) -> dict:
    """The output's records by id, each id exactly once, timings left out."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"ids written more than once: {ids}"
    for r in records:
        for turn in r["turns"]:
            del turn["ttft_s"], turn["decode_tokens_per_s"]
    return {r["id"]: r for r in records}


def torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def generate(ckpt: Path, input_file: Path, output_file: Path) -> list:
    return ["-m", "tp_infer.generate", "--ckpt-path", ckpt, "--input-file", input_file, "--output-file", output_file]


def wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    """Poll condition() until it holds; fail if proc ends or TIMEOUT_S passes first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc, log, timeout=1)
            pytest.fail(f"the job ended or timed out first; log:\n{tail(log)}")
        time.sleep(0.02)


def runs_torchrun(pid: int) -> bool:
    """Whether a child of pid runs torchrun (Linux): the batch script has set its traps and started it."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and b"torch.distributed.run" in (stat.parent / "cmdline").read_bytes():
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")


def slurm_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "slurm.log"
    return log.read_text().splitlines() if log.exists() else []


# ---- the reference: one node, two ranks -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(chat_ckpt, tmp_path_factory):
    """(checkpoint, input file, results of `torchrun --standalone --nproc-per-node 2` on it)."""
    tmp = tmp_path_factory.mktemp("launch_reference")
    input_file = write_jsonl(tmp / "in.jsonl", CONVERSATIONS)
    out, log = tmp / "out.jsonl", tmp / "log.txt"
    cmd = torchrun("--standalone", "--nproc-per-node", "2", *generate(chat_ckpt, input_file, out), *SMALL)
    assert run(cmd, base_env(tmp), log) == 0, tail(log)
    expected = results(out)
    assert sorted(map(str, expected)) == sorted(str(c["id"]) for c in CONVERSATIONS)
    assert all(r["error"] is None for r in expected.values()), expected
    return chat_ckpt, input_file, expected


# ---- the tests ------------------------------------------------------------------------------------------------
def test_two_nodes_match_one_node(job, tmp_path):
    """Two torchrun processes, one rank each, meet by c10d rendezvous on 127.0.0.1 as two nodes would."""
    ckpt, input_file, expected = job
    out = tmp_path / "out.jsonl"
    port = free_port()
    cmd = torchrun(
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-two-nodes",
        *generate(ckpt, input_file, out), *SMALL,
    )  # fmt: skip
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [start(cmd, base_env(tmp_path), log) for log in logs]
    statuses = [finish(node, log) for node, log in zip(nodes, logs, strict=True)]
    assert statuses == [0, 0], "\n".join(tail(log) for log in logs)
    assert results(out) == expected


def test_run_local_matches(job, tmp_path):
    """launch/run_local.sh with NPROC=2: the same torchrun --standalone as the reference, through the wrapper."""
    ckpt, input_file, expected = job
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    env = dict(base_env(tmp_path), NPROC="2")
    assert run(["bash", LAUNCH / "run_local.sh", ckpt, input_file, out, *SMALL], env, log) == 0, tail(log)
    assert results(out) == expected
    assert not list(tmp_path.glob("tp_infer_exit*")), "status file left behind"


def test_run_local_console_ctrl_c_stops_the_reply_only(job, tmp_path):
    """run_local.sh --interactive: SIGINT to the script (a terminal's Ctrl-C reaches its process group) stops the
    reply on rank 0 and the console goes on; torchrun alone would end the session (it takes SIGINT as its end)."""
    ckpt = job[0]
    log = tmp_path / "log.txt"
    cmd = ["bash", LAUNCH / "run_local.sh", ckpt, "--interactive", *OPTS, "--max-new-tokens", "200", "--ignore-eos"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            env=dict(base_env(tmp_path), NPROC="2"),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.stdin.write(b"Hello\n")
    proc.stdin.flush()
    # mid-reply: once it is streaming (a SIGINT timed from the echo alone can come after a fast reply's end)
    wait_for(lambda: len(log.read_bytes().partition(b">>> Hello\n")[2]) >= 20, proc, log)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: b"(reply stopped)" in log.read_bytes(), proc, log)
    proc.stdin.write(b"/exit\n")
    proc.stdin.close()
    assert finish(proc, log, timeout=20) == 0, tail(log)
    assert not list(tmp_path.glob("tp_infer_pid*")), "pid file left behind"


def test_slurm_multi_node_matches(job, tmp_path):
    """srun starts one torchrun per node, which meet on the first host `scontrol show hostnames` names."""
    ckpt, input_file, expected = job
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    env = slurm_env(tmp_path, nodes=2, gpus_on_node=1)
    assert run(["bash", LAUNCH / "slurm_multi_node.sbatch", ckpt, input_file, out, *SMALL], env, log) == 0, tail(log)
    assert results(out) == expected
    calls = slurm_log(tmp_path)
    assert calls == ["scontrol show hostnames node[0-1]", "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1"]
    assert not [p for p in tmp_path.rglob("*") if "tp_infer_exit" in p.name], "status file left behind"


@needs_proc
def test_slurm_single_node_timer_at_startup_requeues_then_rerun_matches(job, tmp_path):
    """SIGUSR1, SLURM's warning before the time limit, while torchrun is still starting: rank 0 never gets to write
    its status, but the shell knows why the job stopped, so it is requeued all the same; the requeued run (same job
    id, SLURM_RESTART_COUNT=1) answers everything."""
    ckpt, input_file, expected = job
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    cmd = ["bash", LAUNCH / "slurm_single_node.sbatch", ckpt, input_file, out, *SMALL]
    proc = start(cmd, slurm_env(tmp_path, nodes=1, gpus_on_node=2), log)
    wait_for(lambda: runs_torchrun(proc.pid), proc, log)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, log) == 0, tail(log)
    assert slurm_log(tmp_path) == [f"scontrol requeue {JOB_ID}"], tail(log)
    assert not out.exists() or len(results(out)) < len(CONVERSATIONS)

    env = slurm_env(tmp_path, nodes=1, gpus_on_node=2, SLURM_RESTART_COUNT="1")
    assert run(cmd, env, log) == 0, tail(log)
    assert slurm_log(tmp_path) == [f"scontrol requeue {JOB_ID}"], "requeued again"
    assert results(out) == expected
    assert not [p for p in tmp_path.rglob("*") if "tp_infer_exit" in p.name], "status file left behind"


@needs_proc
def test_slurm_single_node_sigterm_is_not_requeued(job, tmp_path):
    """SIGTERM to the batch shell (scancel, preemption) stops the job without requeueing it: exit status 75."""
    ckpt, input_file, _ = job
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    cmd = ["bash", LAUNCH / "slurm_single_node.sbatch", ckpt, input_file, out, *SMALL]
    proc = start(cmd, slurm_env(tmp_path, nodes=1, gpus_on_node=2), log)
    wait_for(lambda: runs_torchrun(proc.pid), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == 75, tail(log)
    assert slurm_log(tmp_path) == [], tail(log)


def test_slurm_multi_node_timer_requeues_and_rerun_resumes(job, tmp_path):
    """SIGUSR1 to the batch shell alone, as --signal=B:USR1@120 sends it, mid-run: it becomes a SIGTERM to srun,
    which passes it to the torchruns; rank 0 stops at a step boundary and exits 75, the script requeues the job and
    exits 0; the requeued run (same job id, SLURM_RESTART_COUNT=1) answers the rest."""
    ckpt = job[0]
    input_file = write_jsonl(tmp_path / "in.jsonl", LONG_JOB)
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    cmd = ["bash", LAUNCH / "slurm_multi_node.sbatch", ckpt, input_file, out, *LONG]
    proc = start(cmd, slurm_env(tmp_path, nodes=2, gpus_on_node=1), log)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 1, proc, log)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, log) == 0, tail(log)
    assert f"scontrol requeue {JOB_ID}" in slurm_log(tmp_path), tail(log)
    assert "(rank 0: 75)" in tail(log, 100_000), "not stopped by rank 0 at a step boundary"
    first = results(out)
    assert 1 <= len(first) < len(LONG_JOB), "the signal came after the end: make LONG_JOB longer"

    env = slurm_env(tmp_path, nodes=2, gpus_on_node=1, SLURM_RESTART_COUNT="1")
    assert run(cmd, env, log) == 0, tail(log)
    assert [c for c in slurm_log(tmp_path) if "requeue" in c] == [f"scontrol requeue {JOB_ID}"], "requeued again"
    final = results(out)  # every id exactly once
    assert sorted(final) == sorted(c["id"] for c in LONG_JOB)
    assert all(r["error"] is None and len(r["turns"][0]["token_ids"]) == 20 for r in final.values())
    assert {k: final[k] for k in first} == first
    assert not [p for p in tmp_path.rglob("*") if "tp_infer_exit" in p.name], "status file left behind"


# ---- static checks --------------------------------------------------------------------------------------------
SCRIPTS = [
    "run_local.sh",
    "slurm_single_node.sbatch",
    "slurm_multi_node.sbatch",
    "replicas.sh",
    "slurm_replicas.sbatch",
]
# what the scripts may read of SLURM's environment: variables sbatch documents for the batch script
DOCUMENTED = {
    "SLURM_JOB_ID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_JOB_NODELIST",
    "SLURM_GPUS_ON_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_RESTART_COUNT",
}
# read by the bash of each srun task, where srun sets them (not the batch script's environment)
IN_TASKS = {"slurm_replicas.sbatch": {"SLURM_NODEID"}}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", LAUNCH / script], check=True, timeout=30)
    used = set(re.findall(r"\bSLURM_[A-Z_]+", (LAUNCH / script).read_text()))
    allowed = DOCUMENTED | IN_TASKS.get(script, set())
    assert used <= allowed, f"undocumented SLURM variables: {sorted(used - allowed)}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    subprocess.run(["shellcheck", *(LAUNCH / s for s in SCRIPTS)], check=True, timeout=60)


def health(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_run_local_serves_until_sigterm(chat_ckpt, tmp_path):
    """run_local.sh --serve: the server answers; SIGTERM to the script stops every rank and the script exits 0."""
    port, log = free_port(), tmp_path / "log.txt"
    cmd = ["bash", LAUNCH / "run_local.sh", chat_ckpt, "--serve", *OPTS, "--port", str(port)]
    proc = start(cmd, {**base_env(tmp_path), "NPROC": "2"}, log)
    wait_for(lambda: health(port), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == 0, tail(log)
    assert not health(port)


@needs_proc
def test_slurm_single_node_server_is_requeued_at_the_time_limit(chat_ckpt, tmp_path):
    """The single-node script's serve mode: SLURM's warning before the time limit stops the server and requeues
    the job, to serve on; SIGTERM (scancel) stops it without a requeue."""
    log = tmp_path / "log.txt"
    for sig, requeues in ((signal.SIGUSR1, [f"scontrol requeue {JOB_ID}"]), (signal.SIGTERM, [])):
        (tmp_path / "slurm.log").unlink(missing_ok=True)
        port = free_port()
        cmd = ["bash", LAUNCH / "slurm_single_node.sbatch", chat_ckpt, "--serve", *OPTS, "--port", str(port)]
        proc = start(cmd, slurm_env(tmp_path, nodes=1, gpus_on_node=2), log)
        wait_for(lambda port=port: health(port), proc, log)
        proc.send_signal(sig)
        status = finish(proc, log)
        assert status == 0, f"{sig.name}: exit {status}\n{tail(log, 1500)}"
        assert slurm_log(tmp_path) == requeues, tail(log)
