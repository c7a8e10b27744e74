"""The command line's start-up checks of issue 28, through `python -m tp_infer.generate` (and torchrun): an unsafe
--kv-disk-path is refused in one line before the model loads, remembered reply ids are range-checked against the
model's vocabulary when they are loaded, and --seed takes only what the sampler's generator can."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import CHAT_VOCAB
from processes import ENV, REPO, torchrun

from tp_infer.chat import record_mac
from tp_infer.private_files import folder_secret
from tp_infer.tokenizer import ChatTokenizer

OPTIONS = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "64", "--max-new-tokens", "4"]
LIMIT_S = 180


def generate(world_size: int, ckpt: Path, tmp_path: Path, name: str, lines: list[dict], *extra: str):
    """A batch job over `lines`; returns the finished process (stdout and stderr as text)."""
    (tmp_path / f"{name}.in").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli = ["--ckpt-path", str(ckpt), *OPTIONS, "--input-file", str(tmp_path / f"{name}.in")]
    cli += ["--output-file", str(tmp_path / f"{name}.out"), *extra]
    cmd = [sys.executable, "-m", "tp_infer.generate", *cli] if world_size == 1 else torchrun(world_size, *cli)
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=LIMIT_S)


def records(tmp_path: Path, name: str) -> dict:
    return {r["id"]: r for r in map(json.loads, (tmp_path / f"{name}.out").read_text().splitlines())}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error")]


# ------------------------------------------------------------------------------------------- --kv-disk-path


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_unsafe_disk_folder_is_refused_before_the_model_loads(converted, tmp_path, world_size):
    """A checkpoint folder with its config but no weights: refused for the disk folder, not for the missing
    weights, so the folder was checked first; rank 0 alone says it, in one line."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((converted["v3"] / "config.json").read_text())
    disk = tmp_path / "kv"
    disk.mkdir()
    disk.chmod(0o777)
    run = generate(
        world_size, ckpt, tmp_path, "job", [{"id": 0, "prompt_token_ids": [5, 6]}], "--kv-disk-path", str(disk)
    )
    assert run.returncode != 0
    (line,) = error_lines(run.stderr)
    assert f"kv disk tier: folder {disk} is writable by its group and others (mode 0777)" in line, run.stderr
    assert not re.search(r'File ".*/tp_infer/', run.stderr), "no traceback of ours (torchrun prints its own)"
    assert list(disk.iterdir()) == [], "nothing written in it"


def test_a_safe_disk_folder_still_runs(converted, tmp_path):
    disk = tmp_path / "kv"
    run = generate(
        1, converted["v3"], tmp_path, "job", [{"id": 0, "prompt_token_ids": [5, 6]}], "--kv-disk-path", str(disk)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert records(tmp_path, "job")[0]["error"] is None
    assert disk.stat().st_mode & 0o777 == 0o700 and list(disk.glob("*/replies.jsonl")) == []


# ------------------------------------------------------------------------------ remembered replies at load


@pytest.mark.parametrize("beyond", [False, True], ids=["last id of the model", "first id beyond it"])
def test_remembered_ids_are_checked_against_the_models_vocabulary(chat_ckpt, tmp_path, beyond):
    """A remembered reply's ids set (with a valid code) to the model's last id, which the tokenizer lacks (it has
    fewer tokens than the model has rows): used, without a word. Set to the first id past the model's vocabulary:
    dropped at load in one line naming [0, the model's vocabulary), and the conversation re-tokenised."""
    tokenizer = ChatTokenizer(chat_ckpt)
    assert tokenizer.vocab_size < CHAT_VOCAB - 1
    disk = ["--kv-disk-path", str(tmp_path / "kv")]
    asked = [{"role": "user", "content": "Hello there,"}]
    first = generate(1, chat_ckpt, tmp_path, "first", [{"id": "a", "messages": asked}], *disk)
    assert first.returncode == 0, first.stderr[-3000:]
    (replies,) = (tmp_path / "kv").glob("*/replies.jsonl")
    (record,) = map(json.loads, replies.read_text().splitlines())
    record["ids"] = [CHAT_VOCAB if beyond else CHAT_VOCAB - 1, *tokenizer.eos_token_ids]
    key = bytes.fromhex(record["key"])
    record["mac"] = record_mac(folder_secret(replies.parent), key, record["text"], record["ids"])
    replies.write_text(json.dumps(record) + "\n")

    messages = [*asked, {"role": "assistant", "content": record["text"]}, {"role": "user", "content": "My name is Ada"}]
    second = generate(1, chat_ckpt, tmp_path, "second", [{"id": "b", "messages": messages}], *disk)
    assert second.returncode == 0, second.stderr[-3000:]
    (turn,) = records(tmp_path, "second")["b"]["turns"]
    said = [line for line in second.stderr.splitlines() if "reply memory" in line]
    if beyond:
        assert len(said) == 1 and f"1 with token ids outside the vocabulary [0, {CHAT_VOCAB})" in said[0], said
        assert turn["prompt_tokens"] == len(tokenizer.encode_chat(messages)[0])
    else:
        assert said == []
        prompt = records(tmp_path, "first")["a"]["turns"][0]["prompt_tokens"]
        after = tokenizer.encode("<｜User｜>My name is Ada<｜Assistant｜>")
        assert turn["prompt_tokens"] == prompt + len(record["ids"]) + len(after)


# ---------------------------------------------------------------------------------------------------- --seed


@pytest.mark.parametrize("seed", [2**70, 2**64, -(2**63) - 1])
def test_a_seed_the_generator_cannot_take_is_refused_by_click(tmp_path, seed):
    """Refused while the options are parsed: the checkpoint (missing here) is never looked at."""
    run = generate(1, tmp_path / "no-such-ckpt", tmp_path, "job", [], "--seed", str(seed))
    assert run.returncode == 2
    (line,) = error_lines(run.stderr)
    assert line.startswith("Error: Invalid value for '--seed'") and str(seed) in line, run.stderr
    assert "Traceback" not in run.stderr


def test_the_seeds_at_the_ends_of_the_range_run(converted, tmp_path):
    lines = [{"id": 0, "prompt_token_ids": [5, 6]}]
    for seed in (2**64 - 1, -(2**63)):
        run = generate(1, converted["v3"], tmp_path, f"seed{seed}", lines, "--seed", str(seed), "--temperature", "1")
        assert run.returncode == 0, run.stderr[-3000:]
        assert records(tmp_path, f"seed{seed}")[0]["error"] is None


# ------------------------------------------------------------------------------------- sampling options


@pytest.mark.parametrize(("option", "value"), [("--temperature", "nan"), ("--top-p", "nan"), ("--temperature", "inf")])
def test_a_sampling_option_the_sampler_cannot_take_is_refused_before_the_model_loads(
    converted, tmp_path, option, value
):
    """click takes NaN and infinity as floats; the sampler's own check refuses them at start-up, in one line, before
    the model loads (the job writes nothing)."""
    run = generate(1, converted["v3"], tmp_path, "nan", [{"id": 0, "prompt_token_ids": [5, 6]}], option, value)
    assert run.returncode == 1
    (line,) = error_lines(run.stderr)
    assert line.startswith(f"Error: {option.removeprefix('--').replace('-', '_')} must be") and value in line, line
    assert "backend" not in run.stderr and not (tmp_path / "nan.out").exists()
