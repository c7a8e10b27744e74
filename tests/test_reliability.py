"""Reliability: bad set-up is refused on every rank with one line, bad input is answered and the job goes on, and
a rank that fails or dies ends the whole job quickly with the output intact. Every case runs the real command line
in its own process group and checks that nothing outlives its time limit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import ENV, LIMIT, REPO, assert_gone, kill_all, rank_pids, run_job, torchrun

from tp_infer.distributed import resolve_device

OPTIONS = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "256", "--max-new-tokens", "6"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


# ---- bad set-up: refused before work starts, on every rank, with one line -------------------------------------
@pytest.fixture(scope="module")
def bad_ckpts(chat_ckpt, tmp_path_factory):
    """Broken copies of the chat checkpoint, by name."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    out = {}
    incomplete = root / "incomplete"
    shutil.copytree(chat_ckpt, incomplete)
    (incomplete / "model1-mp2.safetensors").unlink()
    out["incomplete"] = incomplete
    only_mp1 = root / "only_mp1"
    shutil.copytree(chat_ckpt, only_mp1)
    for p in [*only_mp1.glob("*-mp2.safetensors"), *only_mp1.glob("*-mp4.safetensors")]:
        p.unlink()
    out["only_mp1"] = only_mp1
    disagree = root / "disagree"
    shutil.copytree(chat_ckpt, disagree)
    config = json.loads((disagree / "config.json").read_text())
    config["kv_lora_rank"] = 48
    (disagree / "config.json").write_text(json.dumps(config))
    out["disagree"] = disagree
    mis_shaped = root / "mis_shaped"
    shutil.copytree(chat_ckpt, mis_shaped)
    shard = mis_shaped / "model1-mp2.safetensors"
    tensors = load_file(shard)
    tensors["layers.0.attn.wo.weight"] = tensors["layers.0.attn.wo.weight"][:, :-1].contiguous()
    save_file(tensors, shard, {"world_size": "2", "rank": "1"})
    out["mis_shaped"] = mis_shaped
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(chat_ckpt, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    out["no_tokenizer"] = no_tokenizer
    return out


GPUS = torch.cuda.device_count()
# what two ranks with --device cuda are told on a machine without a GPU for each (CI's has none, a lent one has one)
NO_GPU_EACH = "no CUDA device is available" if GPUS == 0 else f"2 ranks on this node but {GPUS} GPU (one each)"
SETUP_CASES = {
    # name: (checkpoint (a bad_ckpts key, or None for the good one), extra arguments, expected message)
    "folder missing": ("/no/such/ckpt", [], "--ckpt-path /no/such/ckpt: no such folder"),
    "shard missing": ("incomplete", [], "model1-mp2.safetensors is missing"),
    "shards for another world size": ("only_mp1", [], "holds shards for world size 1, not 2"),
    "config and weights disagree": ("disagree", [], "has shape"),
    "mis-shaped tensor on rank 1": ("mis_shaped", [], "rank 1: model1-mp2.safetensors: tensor layers.0.attn.wo.weight"),
    "temperature below 0": (None, ["--temperature", "-0.5"], "Invalid value for '--temperature'"),
    "top_p of 0": (None, ["--top-p", "0"], "Invalid value for '--top-p'"),
    "top_p above 1": (None, ["--top-p", "1.5"], "Invalid value for '--top-p'"),
    "max_seq_len of 0": (None, ["--max-seq-len", "0"], "Invalid value for '--max-seq-len'"),
    "output file cannot be written": (None, ["--output-file", "/no/such/dir/out.jsonl"], "cannot be written"),
    "input file missing": (None, ["--input-file", "/no/such/in.jsonl"], "--input-file /no/such/in.jsonl: no such file"),
    "console without tokenizer": ("no_tokenizer", ["--interactive"], "tokenizer.json is missing"),
    "cuda without a GPU per rank": (None, ["--device", "cuda"], f"--device cuda: {NO_GPU_EACH}"),
    "neither console nor batch": (None, ["--no-mode"], "give either --interactive or both"),
}


@pytest.mark.parametrize("case", SETUP_CASES)
def test_bad_setup_is_refused_on_every_rank(case, chat_ckpt, bad_ckpts, tmp_path):
    ckpt, extra, message = SETUP_CASES[case]
    if "--device" in extra and GPUS >= 2:
        pytest.skip(f"this machine has a GPU for each of the two ranks ({GPUS})")
    path = str(chat_ckpt if ckpt is None else bad_ckpts.get(ckpt, ckpt))
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt_token_ids": [0, 5, 6]}) + "\n")
    mode = {"--input-file": str(tmp_path / "in.jsonl"), "--output-file": str(tmp_path / "out.jsonl")}
    args = list(extra)
    if "--interactive" in args or "--no-mode" in args:
        args = [a for a in args if a != "--no-mode"]
    else:
        for flag, value in mode.items():
            if flag not in args:
                args += [flag, value]
    options = [o for o in OPTIONS if not (extra and o == "256" and "--max-seq-len" in extra)]
    if "--max-seq-len" in extra:
        options = ["--device", "cpu", "--dtype", "fp32"]
    status, _, err, _ = run_job(torchrun(2, "--ckpt-path", path, *options, *args))
    assert status != 0
    lines = error_lines(err)
    assert len(lines) == 1, err  # rank 0 alone says it, once
    assert message in lines[0]
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_cuda_takes_a_gpu_per_rank_of_the_node(monkeypatch):
    """NCCL cannot put two ranks on one GPU: a node with fewer GPUs than ranks is refused on each of its ranks alike
    (the local world size, not the local rank, decides), where it used to hand two ranks the same GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == resolve_device("auto", 0, 1) == torch.device("cuda", 0)
    for device in ("cuda", "auto"):
        for local_rank in (0, 1):
            with pytest.raises(ValueError, match=rf"^--device {device}: 2 ranks on this node but 1 GPU \(one each\)"):
                resolve_device(device, local_rank, 2)
    assert resolve_device("cpu", 1, 2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda", 3, 4) == torch.device("cuda", 3)


# ---- bad input: answered, and the job goes on -----------------------------------------------------------------
CONSOLE_CASES = {
    "empty line": ("", "(empty message ignored"),
    "turn that cannot fit": ("Hello there " * 200, "(turn refused: turn needs"),
    "unknown command": ("/frobnicate", "(unknown command /frobnicate"),
    "load of a missing file": ("/load /no/such.json", "(cannot load /no/such.json"),
}


@pytest.fixture(scope="module")
def console_run(chat_ckpt):
    """One console session at world size 2 meeting every bad input, each followed by a good turn."""
    lines = []
    for bad, _ in CONSOLE_CASES.values():
        lines += [bad, "Hello there"]
    stdin = "\n".join(lines).encode() + b"\n\xff\xfe not utf-8\nHello there\n/exit\n"
    cmd = torchrun(2, "--ckpt-path", str(chat_ckpt), "--interactive", *OPTIONS)
    start = time.monotonic()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=180, env=ENV, cwd=REPO, check=False)
    return proc.returncode, proc.stdout.decode(errors="replace"), time.monotonic() - start


@pytest.mark.parametrize("case", [*CONSOLE_CASES, "invalid UTF-8"])
def test_console_bad_input_gets_a_message_and_the_prompt_back(case, console_run):
    status, out, _ = console_run
    assert status == 0
    message = CONSOLE_CASES[case][1] if case in CONSOLE_CASES else "(input is not valid UTF-8"
    assert message in out
    after = out[out.index(message) :]
    assert "[reused" in after, "the next turn still runs"
    assert out.count("[reused") == len(CONSOLE_CASES) + 1


# ---- faults: a rank that fails or dies ends the job within the limit, the output intact ------------------------
def batch_input(path: Path, n: int = 40) -> None:
    lines = [
        json.dumps({"id": f"c{i}", "turns_token_ids": [[0, 5 + i % 50, 6], [7, 8]], "max_new_tokens": 30})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def reference_output(chat_ckpt, tmp_path_factory):
    """The uninterrupted batch output at world size 1, by id."""
    root = tmp_path_factory.mktemp("reference")
    batch_input(root / "in.jsonl")
    cmd = [sys.executable, "-m", "tp_infer.generate", "--ckpt-path", str(chat_ckpt), *OPTIONS, "--ignore-eos"]
    cmd += ["--input-file", str(root / "in.jsonl"), "--output-file", str(root / "out.jsonl")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=ENV, cwd=REPO)
    return {r["id"]: r for r in map(json.loads, (root / "out.jsonl").read_text().splitlines())}


def assert_whole_and_correct(output: Path, reference: dict) -> int:
    text = output.read_text() if output.exists() else ""
    assert text == "" or text.endswith("\n"), "no partial line"
    records = [json.loads(line) for line in text.splitlines()]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert [t["token_ids"] for t in r["turns"]] == [t["token_ids"] for t in reference[r["id"]]["turns"]]
    return len(records)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sigkill_of_a_rank_ends_the_job_and_keeps_whole_records(world_size, chat_ckpt, reference_output, tmp_path):
    batch_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    cmd = torchrun(world_size, "--ckpt-path", str(chat_ckpt), *OPTIONS, "--ignore-eos", "--max-batch-size", "4")
    cmd += ["--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True, cwd=REPO
    )
    ranks = rank_pids(proc.pid, world_size)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(ranks[world_size - 1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        proc.wait(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        kill_all({proc.pid, *ranks.values()})
        pytest.fail(f"the job outlived a killed rank by {LIMIT} s")
    assert proc.returncode != 0
    assert time.monotonic() - killed < LIMIT
    assert_gone(set(ranks.values()))
    written = assert_whole_and_correct(out, reference_output)
    assert 2 <= written < 40


def test_an_exception_on_a_follower_ends_the_job_with_one_line(chat_ckpt, reference_output, tmp_path):
    batch_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    env = {**ENV, "FAULT_RANK": "1", "FAULT_AFTER": "40"}
    cmd = torchrun(
        2, "--ckpt-path", str(chat_ckpt), *OPTIONS, "--ignore-eos", script=str(REPO / "tests" / "faulty_rank.py")
    )
    cmd += ["--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(out)]
    status, _, err, _ = run_job(cmd, env=env)
    assert status != 0
    lines = error_lines(err)
    assert "Error: rank 1: RuntimeError: injected fault in the forward" in lines, err
    assert_whole_and_correct(out, reference_output)


def test_a_hung_follower_ends_the_job_within_the_limit(chat_ckpt, reference_output, tmp_path):
    """A follower that stays alive but stops answering: rank 0 names it after --collective-timeout, and torchrun
    kills it (a follower ignores SIGTERM, so that on preemption rank 0 can end its step) 30 s after rank 0 exits."""
    batch_input(tmp_path / "in.jsonl")
    out, mark = tmp_path / "out.jsonl", tmp_path / "hung"
    env = {**ENV, "FAULT_RANK": "1", "FAULT_AFTER": "80", "FAULT_KIND": "hang", "FAULT_MARK": str(mark)}
    cmd = torchrun(
        2, "--ckpt-path", str(chat_ckpt), *OPTIONS, "--ignore-eos", script=str(REPO / "tests" / "faulty_rank.py")
    )
    cmd += ["--collective-timeout", "5", "--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(out)]
    started = time.time()
    status, _, err, elapsed = run_job(cmd, env=env, limit=LIMIT + 30)  # the start-up comes before the hang
    assert status != 0
    assert mark.exists(), "the follower hung"
    assert started + elapsed - mark.stat().st_mtime < LIMIT, "from the hang to the end of every rank"
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1: no answer within 5 s in "), err
    assert 0 < assert_whole_and_correct(out, reference_output) < 40
