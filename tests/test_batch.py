"""The batch job through the real command line: the four input forms and every kind of bad line at world sizes 1
and 2, preemption by signals at random points under torchrun with restarts, and resuming a torn output file."""

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import device_option, free_port

REPO = Path(__file__).resolve().parent.parent
OPTIONS = ["--dtype", "fp32", "--max-seq-len", "256", "--max-batch-size", "3"]
MAX_NEW = 6
WORDS = ["Hello there,", "how are you today?", "My name is Ada", "and I live in Paris.", "The code is 4821."]


def conversations() -> tuple[list[str], dict]:
    """30 good conversations of the four forms with the bad lines among them (JSON strings, one a line), and the
    good ones by id."""
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.sample(WORDS, 2))

    def ids(n: int) -> list[int]:
        return [rng.randrange(4, 320) for _ in range(n)]

    good = {}
    for i in range(30):
        form = i % 4
        if form == 0:
            rec = {"id": f"chat-{i}", "system": "Be brief.", "turns": [text() for _ in range(2 + i % 2)]}
        elif form == 1:
            rec = {"id": i, "turns_token_ids": [ids(rng.randrange(2, 10)) for _ in range(2 + i % 2)]}
        elif form == 2:
            rec = {
                "id": f"msg-{i}",
                "messages": [{"role": "system", "content": "Hi."}, {"role": "user", "content": text()}],
            }
        else:
            rec = {"id": f"raw-{i}", "prompt_token_ids": [0, *ids(8)]}
        if i == 5:
            rec["temperature"] = 0.8
        if i == 6:
            rec["max_new_tokens"] = 3
        good[rec["id"]] = rec
    lines = [json.dumps(rec) for rec in good.values()]
    bad = [
        '{"id": "torn", "turns": ["a"',
        json.dumps({"messages": [{"role": "user", "content": "no id"}]}),
        json.dumps({"id": "chat-0", "turns": ["the same id again"]}),
        json.dumps({"id": "wizard", "messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"id": "empty", "turns": []}),
        json.dumps({"id": "oov", "prompt_token_ids": [1, 2, 320]}),
        json.dumps({"id": "long", "prompt_token_ids": [5] * 251}),
        json.dumps({"id": "neg", "prompt_token_ids": [1, 2], "max_new_tokens": -1}),
        json.dumps({"id": "late-long", "turns": ["Hello there", "Hello there " * 100]}),
    ]
    for k, line in enumerate(bad):  # spread among the good ones, so that they meet conversations in flight
        lines.insert(1 + 3 * k, line)
    return lines, good


# what each bad line's error must say, by its id (or, without one, by what the line holds)
EXPECTED_ERRORS = {
    "torn": "malformed JSON",
    "no id": "missing id",
    "chat-0": "duplicate id",
    "wizard": "unknown role 'wizard'",
    "empty": "turns must be a non-empty list",
    "oov": "out of the vocabulary [0, 320)",
    "long": "more than max_seq_len 256",
    "neg": "max_new_tokens must be an integer >= 1",
    "late-long": "turn 1: ",
}


def command(world_size: int, ckpt: Path, input_file: Path, output_file: Path, *extra: str) -> list[str]:
    cli = ["-m", "tp_infer.generate", "--ckpt-path", str(ckpt), *OPTIONS, *extra, "--max-new-tokens", str(MAX_NEW)]
    cli += device_option(world_size)
    cli += ["--input-file", str(input_file), "--output-file", str(output_file)]
    if world_size == 1:
        return [sys.executable, *cli]
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world_size), "--master-port", str(free_port())]
    return [sys.executable, *launcher, *cli]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(
    world_size: int, ckpt: Path, input_file: Path, output_file: Path, *extra: str
) -> subprocess.CompletedProcess:
    out = subprocess.run(
        command(world_size, ckpt, input_file, output_file, *extra), cwd=REPO, env=ENV, capture_output=True, timeout=180
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out


def load(path: Path) -> dict:
    """Records by (id, input line); fails on a torn line or a line answered twice."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the output must never end in a partial line"
    records = {}
    for raw in data.splitlines():
        record = json.loads(raw)
        key = (json.dumps(record["id"]), record["line"])
        assert key not in records, f"{key} written twice"
        records[key] = record
    return records


def essentials(records: dict) -> dict:
    """What must not depend on world size, batching or restarts (timings excluded, and how much of a prompt was
    cached: that depends on which lines ran before it in the same job)."""
    keep = ("text", "token_ids", "finish_reason", "prompt_tokens")
    return {k: ([{f: t[f] for f in keep} for t in r["turns"]], r["error"]) for k, r in records.items()}


@pytest.fixture(scope="module")
def job(chat_ckpt, tmp_path_factory):
    """The input file and its uninterrupted outputs at world sizes 1 and 2 (the cpu backend), and at 2 with the torch
    backend (PyTorch's ops alone, sync-free)."""
    root = tmp_path_factory.mktemp("batch")
    input_file = root / "in.jsonl"
    lines, good = conversations()
    input_file.write_text("\n".join(lines[:12]) + "\n\n" + "\n".join(lines[12:]) + "\n")  # a blank line is skipped
    outputs = {}
    for world_size in (1, 2):
        outputs[world_size] = root / f"out{world_size}.jsonl"
        run_cli(world_size, chat_ckpt, input_file, outputs[world_size])
    outputs["pytorch"] = root / "out-pytorch.jsonl"
    run_cli(2, chat_ckpt, input_file, outputs["pytorch"], "--backend", "torch")
    return {"input": input_file, "lines": lines, "good": good, "out": outputs, "root": root}


def test_all_forms_and_bad_lines_at_world_sizes_1_and_2(job):
    one, two = load(job["out"][1]), load(job["out"][2])
    assert len(two) == len(job["lines"]), "one output line per non-blank input line"
    assert essentials(two) == essentials(one)
    assert essentials(load(job["out"]["pytorch"])) == essentials(one), "the torch backend changes no reply"

    by_id = {r["id"]: r for r in two.values() if r["error"] is None}
    errors = [r for r in two.values() if r["error"] is not None]
    assert len(by_id) == 30 and len(errors) == len(EXPECTED_ERRORS)
    for record in errors:
        name = record["id"] if record["id"] is not None else "no id"
        if record["error"].startswith("malformed"):
            name = "torn"
        assert EXPECTED_ERRORS[name] in record["error"], record
        assert "\n" not in record["error"]
    late = next(r for r in errors if r["id"] == "late-long")
    assert len(late["turns"]) == 1, "the turn completed before the refused one is kept"

    generated = set()
    for rec in job["good"].values():
        turns = by_id[rec["id"]]["turns"]
        assert len(turns) == len(rec.get("turns") or rec.get("turns_token_ids") or [None])
        limit = rec.get("max_new_tokens", MAX_NEW)
        history = 0
        for k, t in enumerate(turns):
            assert t["finish_reason"] in ("stop", "length")
            assert 1 <= len(t["token_ids"]) <= limit
            assert t["finish_reason"] == "stop" or len(t["token_ids"]) == limit
            assert isinstance(t["text"], str) and t["ttft_s"] > 0 and t["decode_tokens_per_s"] >= 0
            assert t["reused_tokens"] + t["computed_tokens"] == t["prompt_tokens"] and t["dropped_tokens"] == 0
            # a later turn finds the whole history (prompt and reply, stop token included) in the cache; any turn may
            # find more, left by another line with the same opening
            assert t["reused_tokens"] >= history
            assert k == 0 or t["reused_tokens"] > 0
            if "turns_token_ids" in rec:
                assert t["computed_tokens"] <= len(rec["turns_token_ids"][k]), "only the new tokens are computed"
            history = t["prompt_tokens"] + len(t["token_ids"])
            generated.update(t["token_ids"])
        if "prompt_token_ids" in rec:
            assert turns[0]["prompt_tokens"] == len(rec["prompt_token_ids"])
    assert len(generated) > 20, "a degenerate model would make the comparisons vacuous"


def processes_under(pid: int) -> list[int]:
    """The children of pid (torchrun's workers), from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# where the signal goes: torchrun alone (it forwards it to the workers; Ctrl-C in a terminal reaches torchrun),
# every process (a SLURM time limit), or rank 0 alone (which then exits 75, as torchrun's summary shows)
KILLS = [("launcher", signal.SIGINT), ("everyone", signal.SIGTERM), ("rank0", signal.SIGTERM)]


def test_signals_at_random_points_then_restarts_give_the_uninterrupted_output(job, chat_ckpt):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    output = job["root"] / "killed.jsonl"
    for n, (where, sig) in enumerate(KILLS):
        before = count_lines(output)
        log_file = job["root"] / f"killed-{n}.log"
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(
                command(2, chat_ckpt, job["input"], output),
                cwd=REPO,
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # a random point: after this run has written 1 to 5 lines (error records are written as soon as
            # they are read, conversations when they finish), and a little more
            target, deadline = before + rng.randint(1, 5), time.monotonic() + 120
            while count_lines(output) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
            assert proc.poll() is None, f"seed {seed}: the job ended before the {where} kill"
            workers = processes_under(proc.pid)
            targets = {
                "launcher": [proc.pid],
                "everyone": [proc.pid, *workers],
                "rank0": [w for w in workers if rank_of(w) == 0],
            }[where]
            assert targets
            for pid in targets:
                os.kill(pid, sig)
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                for pid in [*processes_under(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
        log = log_file.read_text(errors="replace")
        # torchrun itself exits 1 whether it was signalled or saw rank 0 exit 75 (see tp_infer/batch.py)
        assert proc.returncode == 1, f"seed {seed}, {where}: torchrun returned {proc.returncode}\n{log[-3000:]}"
        assert f"stopped by {sig.name}" in log, f"seed {seed}, {where}:\n{log[-3000:]}"
        if where == "rank0":
            assert re.search(r"exitcode\s*:\s*75\b", log), log[-3000:]
        written = load(output)  # whole lines only, none twice
        assert len(written) >= before and len(written) < len(job["lines"]), f"seed {seed}, {where}"
    run_cli(2, chat_ckpt, job["input"], output)
    assert essentials(load(output)) == essentials(load(job["out"][2])), f"seed {seed}"


def test_resume_cuts_a_torn_line_and_skips_what_is_written(job, chat_ckpt):
    reference = job["out"][1].read_bytes().splitlines(keepends=True)
    output = job["root"] / "torn.jsonl"
    kept = b"".join(reference[:10])
    output.write_bytes(kept + reference[10][: len(reference[10]) // 2])
    out = run_cli(1, chat_ckpt, job["input"], output)
    stderr = out.stderr.decode()
    assert "cut a partial last line" in stderr and "10 lines already answered" in stderr
    assert output.read_bytes().startswith(kept), "what was written stays as it was"
    assert essentials(load(output)) == essentials(load(job["out"][1]))
    again = run_cli(1, chat_ckpt, job["input"], output)  # all done: nothing is written twice
    assert f"{len(job['lines'])} lines already answered" in again.stderr.decode()
    assert essentials(load(output)) == essentials(load(job["out"][1]))


def test_without_tokenizer_raw_ids_run_and_text_forms_are_refused(job, chat_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in chat_ckpt.iterdir():
        if f.name.endswith((".safetensors", "config.json")) and not f.name.startswith("tokenizer"):
            shutil.copy(f, ckpt / f.name)
    output = tmp_path / "out.jsonl"
    run_cli(1, ckpt, job["input"], output)
    reference = {r["id"]: r for r in load(job["out"][1]).values() if r["error"] is None}
    records = {
        r["id"]: r
        for r in load(output).values()
        if r["id"] in job["good"] and not (r["error"] or "").startswith("duplicate")
    }
    assert records.keys() == job["good"].keys()
    for key, rec in job["good"].items():
        record = records[key]
        if "messages" in rec or "turns" in rec:
            assert "needs a tokenizer" in record["error"] and record["turns"] == []
            continue
        assert record["error"] is None and all(t["text"] is None for t in record["turns"])
        # without a tokenizer there is no eos to stop at: the reply goes on where the reference stopped
        first, ref = record["turns"][0]["token_ids"], reference[key]["turns"][0]["token_ids"]
        assert first[: len(ref)] == ref


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": 1, "prompt_token_ids": [1], "max_new_token": 3}, "unknown key 'max_new_token'"),
        ({"id": 1, "prompt_token_ids": [1], "messages": []}, "give exactly one of"),
        ({"id": 1}, "give exactly one of"),
        ({"id": 1, "prompt_token_ids": [1], "temperature": -0.5}, "temperature must be a number >= 0"),
        ({"id": 1, "prompt_token_ids": [1], "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"id": 1, "prompt_token_ids": [1], "system": "x"}, "only goes with turns"),
        ({"id": 1, "prompt_token_ids": [True]}, "is not an integer token id"),
        ({"id": 1, "turns_token_ids": [[1], []]}, "turns_token_ids[1] must be a non-empty list"),
        ({"id": 1, "turns_token_ids": [[1], [2] * 60]}, "turn 1: 60 prompt tokens"),
        ({"id": 1, "turns": ["hi"]}, "needs a tokenizer"),
    ],
)
def test_bad_fields_are_named(line, message):
    from tp_infer.batch import LineError, parse_request
    from tp_infer.engine.sampling import SamplingParams

    with pytest.raises(LineError) as e:
        parse_request(line, SamplingParams(max_new_tokens=6), vocab_size=320, max_seq_len=64, tokenizer=None)
    assert message in str(e.value)


def test_repair_tail_cuts_a_torn_line_and_completes_a_whole_one(tmp_path):
    from tp_infer.batch import repair_tail

    path = tmp_path / "out.jsonl"
    for data, cut, after in [
        (b"", 0, b""),
        (b'{"a": 1}\n', 0, b'{"a": 1}\n'),
        (b'{"a": 1}\n{"b": [1, ', 10, b'{"a": 1}\n'),
        (b'{"a": 1}\n{"b": 2}', 0, b'{"a": 1}\n{"b": 2}\n'),
        (b"x" * 100_000, 100_000, b""),
    ]:
        path.write_bytes(data)
        assert repair_tail(str(path)) == cut
        assert path.read_bytes() == after


def test_messages_lines_that_continue_each_other_compute_only_their_new_tokens(chat_ckpt, tmp_path):
    """Line k of a messages batch is line k-1's conversation plus its reply and one more user message, the way chat
    clients send it: each line computes only its new tokens (the reply's own ids are found again, not
    re-tokenised), and the replies equal one multi-turn conversation's."""
    users = ["Hello there,", "My name is Ada", "how are you today?", "The code is 4821."]
    first, out_a = tmp_path / "a.jsonl", tmp_path / "a.out.jsonl"
    first.write_text(json.dumps({"id": "a", "system": "Be brief.", "turns": users}) + "\n")
    run_cli(1, chat_ckpt, first, out_a)
    replies = [t["text"] for t in json.loads(out_a.read_text())["turns"]]
    lines, messages = [], [{"role": "system", "content": "Be brief."}]
    for k, user in enumerate(users):
        messages = [*messages, {"role": "user", "content": user}]
        lines.append(json.dumps({"id": f"m{k}", "messages": messages}))
        messages = [*messages, {"role": "assistant", "content": replies[k]}]
    second, out_b = tmp_path / "b.jsonl", tmp_path / "b.out.jsonl"
    second.write_text("\n".join(lines) + "\n")
    run_cli(2, chat_ckpt, second, out_b)
    records = {r["id"]: r["turns"][0] for r in map(json.loads, out_b.read_text().splitlines())}
    turns = [records[f"m{k}"] for k in range(len(users))]
    assert [t["text"] for t in turns] == replies
    assert turns[0]["reused_tokens"] == 0
    for before, turn in itertools.pairwise(turns):
        history = before["prompt_tokens"] + len(before["token_ids"])
        assert turn["reused_tokens"] == history, "the earlier line's prompt and reply come from the cache"
        assert 0 < turn["computed_tokens"] == turn["prompt_tokens"] - history
