"""Soak: one long console conversation at world size 2 and a small max_seq_len, so that the overflow policy drops old
turns again and again. No error, every turn computes exactly what the policy says, and the ranks' memory stays flat.
CI runs 200 turns; TP_INFER_SOAK_TURNS=5000 runs a longer soak."""

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from processes import ENV, REPO, assert_gone, descendants, kill_all, rank_pids, torchrun

TURNS = int(os.environ.get("TP_INFER_SOAK_TURNS", "200"))
MAX_SEQ_LEN, MAX_NEW = 128, 4
WARM_TURNS = 20  # memory is measured from here: every code path, overflow included, has run by then
# Flat: the model and the whole KV cache are allocated at start-up, so after warm-up only leaks make RSS grow. The
# allowance (5% and 8 MB, about 20 MB here) covers allocator noise and the console's message history (rank 0 keeps
# every message for /save: measured +2 MB at 200 turns, +8 MB at 5000); it catches a leak of 100 KB a turn in 200
# turns, 4 KB in 5000.
RSS_SLACK = 0.05
RSS_SLACK_BYTES = 8 << 20
SENTENCES = ["Hello there, how are you today?", "My name is Ada and I live in Paris.", "The code is 4821."]
STATS = re.compile(r"^\[reused (\d+) \S computed (\d+) \S generated (\d+) ")
SAVED = re.compile(r"^\(saved \d+ messages to (.+)\)$")


def message(i: int) -> str:
    """User messages of 5 to about 45 tokens, so that dropping one old turn sometimes makes room for several."""
    return " ".join(SENTENCES[(i + j) % 3] for j in range(1 + i * 7 % 5))


def fit(tokens: list[int], starts: list[int]) -> tuple[list[int], list[int]]:
    """The overflow policy, written independently of the engine: drop the oldest whole turns after the system prompt
    until the prompt and its reply fit."""
    while len(tokens) + MAX_NEW > MAX_SEQ_LEN and len(starts) > 1:
        cut = starts[1] - starts[0]
        tokens = tokens[: starts[0]] + tokens[starts[1] :]
        starts = [s - cut for s in starts[1:]]
    return tokens, starts


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


def test_long_conversation_through_the_overflow_policy(chat_ckpt, tmp_path):
    cmd = torchrun(2, "--ckpt-path", str(chat_ckpt), "--interactive", "--device", "cpu", "--dtype", "fp32")
    cmd += ["--max-seq-len", str(MAX_SEQ_LEN), "--max-new-tokens", str(MAX_NEW), "--system", "Be brief."]
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=ENV, cwd=REPO, start_new_session=True
        )
        ranks = rank_pids(proc.pid, 2)
        everyone = {proc.pid, *ranks.values(), *descendants(proc.pid)}
        watchdog = threading.Timer(120 + TURNS * 0.5, kill_all, [everyone])  # a stalled console fails, not hangs
        watchdog.start()

        def ask() -> None:
            for i in range(TURNS):
                proc.stdin.write(f"{message(i)}\n/save {tmp_path / f'turn{i}.json'}\n".encode())
                proc.stdin.flush()

        writer = threading.Thread(target=ask, daemon=True)
        writer.start()
        stats, saves, rss, started = [], [], {}, time.monotonic()
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            assert not line.startswith("(turn refused"), line
            if m := STATS.match(line):
                stats.append(tuple(map(int, m.groups())))
            elif m := SAVED.match(line):
                path = Path(m.group(1))
                saved = json.loads(path.read_text())
                path.unlink()  # a long soak keeps its disk flat too
                saves.append((saved["token_ids"], saved["turn_starts"]))
                if len(saves) in (WARM_TURNS, TURNS):
                    rss[len(saves)] = {rank: rss_bytes(pid) for rank, pid in ranks.items()}
                if len(saves) == TURNS:
                    writer.join()
                    proc.stdin.write(b"/exit\n")
                    proc.stdin.close()
        status = proc.wait()
        watchdog.cancel()
        elapsed = time.monotonic() - started
        err.seek(0)
        stderr = err.read()
    assert_gone(everyone)
    assert status == 0, stderr[-3000:]
    assert "Error" not in stderr
    assert len(stats) == len(saves) == TURNS, f"{len(stats)} replies and {len(saves)} saves of {TURNS} turns"

    overflows, previous, system = 0, None, None
    for turn, ((reused, computed, generated), (tokens, starts)) in enumerate(zip(stats, saves, strict=True)):
        prompt = tokens[: len(tokens) - generated]
        new = prompt[starts[-1] :]
        if previous is None:  # the first turn: the system prompt and the message, nothing cached
            system, cached = prompt[: starts[0]], []
        else:
            cached, previous_starts = previous
            expected = fit(cached + new, [*previous_starts, len(cached)])
            assert (prompt, starts) == expected, f"turn {turn}: the prompt is not what the policy keeps"
            overflows += len(prompt) < len(cached) + len(new)
        assert prompt[: len(system)] == system, f"turn {turn}: the system prompt was dropped"
        # at least the longest common prefix with the previous turn's conversation comes from the cache; after an
        # overflow the prefix tree may hold more (an earlier turn's state of the conversation)
        reuse = min(common_prefix(cached, prompt), len(prompt) - 1)
        assert reuse <= reused <= len(prompt) - 1 and computed == len(prompt) - reused, f"turn {turn}"
        if previous is not None and len(prompt) == len(cached) + len(new):
            assert computed == len(new), f"turn {turn}: without overflow only the new tokens are computed"
        previous = tokens, starts
    assert overflows >= TURNS // 4, f"the policy fired only {overflows} times in {TURNS} turns"
    assert TURNS - overflows >= TURNS // 10, "turns without overflow must be checked too"

    for rank, start in rss[WARM_TURNS].items():
        end = rss[TURNS][rank]
        growth = end - start
        print(f"rank {rank}: RSS {start / 2**20:.1f} MB at turn {WARM_TURNS}, {end / 2**20:.1f} MB at turn {TURNS}")
        assert growth < RSS_SLACK * start + RSS_SLACK_BYTES, f"rank {rank} grew by {growth / 2**20:.1f} MB"
    print(f"{TURNS} turns, {overflows} through the overflow policy, {elapsed:.1f} s")
