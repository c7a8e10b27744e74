"""The interactive console through a pipe: multi-turn reuse, commands, save/load across processes, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from harness import device_option

OPTIONS = ["--dtype", "fp32", "--max-seq-len", "256", "--max-new-tokens", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ONE_RANK = [sys.executable, "-m", "tp_infer.generate"]  # world size 1 needs no torchrun


def console(ckpt, lines: list[str], world_size: int = 2, extra=(), timeout: float = 180) -> subprocess.CompletedProcess:
    if world_size == 1:
        launcher = ONE_RANK
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
        launcher += ["-m", "tp_infer.generate"]
    cmd = [*launcher, "--ckpt-path", str(ckpt), "--interactive", *OPTIONS, *device_option(world_size), *extra]
    return subprocess.run(
        cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


def test_console_multi_turn_commands_and_resume(chat_ckpt, tmp_path):
    first, second, third = "Hello there", "My name is Ada", "how are you today?"
    half, full, cleared = tmp_path / "half.json", tmp_path / "full.json", tmp_path / "cleared.json"
    run = console(
        chat_ckpt,
        [
            first,
            second,
            "/stats",
            f"/save {half}",
            third,
            f"/save {full}",
            "/clear",
            first,
            f"/save {cleared}",
            "/exit",
        ],
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # /stats: the second turn reused the first turn's cache
    conversation_stats = next(line for line in out.splitlines() if line.startswith("conversation: 2 turns"))
    reused = int(conversation_stats.split("reused ")[1].split()[0])
    assert reused > 0
    # one reuse line per reply; after the first turn, each turn computes only its new tokens
    stat_lines = [line for line in out.splitlines() if line.startswith("[reused")]
    assert len(stat_lines) == 4
    assert stat_lines[0].startswith("[reused 0 ") and not stat_lines[1].startswith("[reused 0 ")
    saved_full = json.loads(full.read_text())
    assert [m["role"] for m in saved_full["messages"]] == ["user", "assistant"] * 3
    for message in saved_full["messages"][1::2]:
        assert message["content"] in out, "replies are streamed to stdout"
    # /clear starts over: the same first message gets the same first reply, in a one-turn conversation
    saved_cleared = json.loads(cleared.read_text())
    assert saved_cleared["messages"] == saved_full["messages"][:2]
    assert saved_full["token_ids"][: len(saved_cleared["token_ids"])] == saved_cleared["token_ids"]

    # a new process loads the half-way conversation and continues it exactly as the first process did
    resumed = tmp_path / "resumed.json"
    run2 = console(chat_ckpt, [f"/load {half}", third, f"/save {resumed}", "/exit"])
    assert run2.returncode == 0, run2.stderr
    saved_resumed = json.loads(resumed.read_text())
    assert saved_resumed["token_ids"] == saved_full["token_ids"]
    assert saved_resumed["messages"] == saved_full["messages"]
    # the loaded history was recomputed once, on the turn after /load
    assert "[reused 0 " in run2.stdout


def test_console_bad_input_gets_a_message_and_the_prompt_back(chat_ckpt, tmp_path):
    too_long = "Hello there " * 200
    lines = ["", "/nonsense", too_long, "/load /no/such/file.json", "/save", "Hello there", "/exit"]
    run = console(chat_ckpt, lines, world_size=1)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "(empty message ignored" in out
    assert "(unknown command /nonsense" in out
    assert "(turn refused:" in out and "max_seq_len 256" in out
    assert "(cannot load /no/such/file.json" in out
    assert "(usage: /save FILE)" in out
    assert out.count("[reused") == 1, "the session still works after the refused turn"


def test_console_invalid_utf8_is_ignored(chat_ckpt):
    cmd = [*ONE_RANK, "--ckpt-path", str(chat_ckpt), "--interactive", *OPTIONS, *device_option(1)]
    run = subprocess.run(
        cmd, input=b"\xff\xfe bad\nHello there\n", capture_output=True, timeout=120, env=ENV, check=False
    )
    assert run.returncode == 0, run.stderr
    assert b"not valid UTF-8" in run.stdout
    assert run.stdout.count(b"[reused") == 1


def test_ctrl_c_stops_the_reply_and_keeps_it(chat_ckpt, tmp_path):
    saved = tmp_path / "after.json"
    cmd = [*ONE_RANK, "--ckpt-path", str(chat_ckpt), "--interactive", *OPTIONS, *device_option(1)]
    cmd += ["--max-new-tokens", "200", "--ignore-eos"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, text=True
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    proc.stdin.write("Hello there\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while len(chunks) < 5 and time.monotonic() < deadline:  # wait until the reply is streaming
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write(f"/save {saved}\n/exit\n")
    proc.stdin.flush()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    assert "(reply stopped)" in "".join(chunks)
    data = json.loads(saved.read_text())
    assert data["messages"][0]["content"] == "Hello there" and data["messages"][1]["role"] == "assistant"
    assert 0 < len(data["token_ids"]) - 5 < 200, "a partial reply stays in the history"
