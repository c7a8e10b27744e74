"""launch/slurm_replicas.sbatch under a fake SLURM (srun and scontrol, the documented variables): the commands it
builds for replicas of several nodes, and a job of two nodes run for real on this machine: one replica across both
(torchrun's node rank from the step, so its HTTP server is on the group's first node) behind the gateway, answering
a conversation, then stopped by SIGTERM, as scancel does."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from harness import free_port
from processes import REPO, assert_gone, descendants, kill_all

SMG = Path(sys.executable).with_name("smg")
pytestmark = pytest.mark.skipif(not SMG.exists(), reason="smg is not installed (pip install -e .[test])")
SCRIPT = REPO / "launch" / "slurm_replicas.sbatch"

FAKE_SRUN = '''#!{python}
"""Fake srun: runs its command once per node of the step (--nodes=K, from node --relative=R of the job), all on this
machine, with SLURM_NODEID the task's node in the step; forwards SIGTERM/SIGINT to them."""
import os, signal, subprocess, sys, time

args, opts = sys.argv[1:], {}
while args and args[0].startswith("--"):
    name, _, value = args.pop(0)[2:].partition("=")
    opts[name] = value
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(f"--{k}={v}" for k, v in opts.items()) + "\\n")
nodes = int(opts.get("nodes", os.environ["SLURM_JOB_NUM_NODES"]))
tasks = [
    subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0"))
    for n in range(nodes)
]

def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
status = 0
while any(t.poll() is None for t in tasks):
    if any(t.poll() not in (None, 0) for t in tasks) and opts.get("kill-on-bad-exit") == "1":
        forward(signal.SIGTERM, None)
    time.sleep(0.05)
sys.exit(max(abs(t.returncode) for t in tasks))
'''

FAKE_SCONTROL = """#!/bin/sh
# Fake scontrol: `show hostnames LIST` prints NODE_NAME (or node0, node1, ...) once per node of the job.
i=0
while [ "$i" -lt "$SLURM_JOB_NUM_NODES" ]; do echo "${NODE_NAME:-node$i}"; i=$((i + 1)); done
"""


def slurm_env(tmp_path: Path, nodes: int, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN.replace("{python}", sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "TORCHELASTIC_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=f"node[0-{nodes - 1}]",
        **extra,
    )
    return env


def test_the_commands_for_replicas_of_two_nodes(tmp_path):
    env = slurm_env(tmp_path, 4, NODES_PER_REPLICA="2", NPROC="8", DRY_RUN="1", GATEWAY_API_KEY="k")
    run = subprocess.run(
        ["bash", str(SCRIPT), "/ckpt", "--max-seq-len", "4096"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3, run.stdout
    for i, line in enumerate(lines[:2]):  # replica i: nodes 2i, 2i+1; rank 0 on node 2i; port 8001 + i
        assert line.startswith(f"srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --relative={2 * i} "), line
        assert "--node-rank" in line and "SLURM_NODEID" in line, line
        assert f"--nnodes 2 --nproc-per-node 8 --master-addr node{2 * i} --master-port {20000 + 4242 + i} " in line
        assert line.rstrip().endswith(f"--port {8001 + i} --api-key k --max-seq-len 4096"), line
    gateway = lines[2].split()
    assert gateway[1:5] == ["launch", "--worker-urls", "http://node0:8001", "http://node2:8002"], lines[2]
    for option in (["--policy", "consistent_hashing"], ["--host", "127.0.0.1"], ["--api-key", "k"]):
        assert " ".join(option) in lines[2], lines[2]
    bad = subprocess.run(["bash", str(SCRIPT), "/ckpt"], env={**env, "NODES_PER_REPLICA": "3"}, capture_output=True)
    assert bad.returncode == 2 and b"not a whole number of replicas" in bad.stderr


def test_a_replica_of_two_nodes_behind_the_gateway_then_scancel(chat_ckpt, tmp_path):
    port, gateway_port = free_port(), free_port()
    env = slurm_env(
        tmp_path,
        2,
        NODES_PER_REPLICA="2",
        NPROC="1",
        NODE_NAME="127.0.0.1",
        PORT=str(port),
        REPLICA_HOST="127.0.0.1",
        GATEWAY_PORT=str(gateway_port),
        METRICS_PORT=str(free_port()),
        RDZV_PORT=str(free_port()),
        HEALTH_INTERVAL="1",
    )
    options = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "256", "--max-new-tokens", "4"]
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            ["bash", str(SCRIPT), str(chat_ckpt), *options],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gateway, seen = f"http://127.0.0.1:{gateway_port}", set()
    try:
        deadline = time.monotonic() + 120
        while True:
            seen |= descendants(job.pid)
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                workers = httpx.get(f"{gateway}/workers", timeout=2).json()["workers"]
                if [w["url"] for w in workers if w["is_healthy"]] == [f"http://127.0.0.1:{port}"]:
                    break
            if job.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job ended or timed out first:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="ckpt",
            messages=[{"role": "user", "content": "Hello there"}],
            temperature=0,
            extra_headers={"X-SMG-Routing-Key": "conversation-1"},
        )
        assert reply.usage.completion_tokens >= 1
        srun = [line for line in (tmp_path / "slurm.log").read_text().splitlines() if line.startswith("srun")]
        assert srun == ["srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --relative=0 --kill-on-bad-exit=1"]
        seen |= descendants(job.pid)
        job.send_signal(signal.SIGTERM)  # scancel
        assert job.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert_gone(seen)
    finally:
        if job.poll() is None:
            kill_all({job.pid, *seen, *descendants(job.pid)})
