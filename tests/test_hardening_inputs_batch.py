"""Issue 28, the batch job: a line with sampling values the sampler cannot take gets an error record naming the
field and the job answers the rest (a rerun answers nothing twice); values it can take, however extreme, run; a turn
that fails while it runs ends its line alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import device_option, run_ranks
from rank_fns import serve

from tp_infer.batch import LineError, parse_request
from tp_infer.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
ENV_THREADS = {"OMP_NUM_THREADS": "1"}


def raw(i: int, **extra) -> dict:
    return {"id": i, "prompt_token_ids": [5 + i, 6, 7, 8], **extra}


# id -> (extra fields, the error's words or None for a line that must be answered)
LINES = {
    0: ({}, None),
    1: ({"temperature": 1e-300}, None),
    2: ({"temperature": 1, "top_p": 1e-50}, None),
    3: ({"temperature": 1, "top_p": 5e-324}, None),
    4: ({"temperature": 5e-324, "top_k": 3, "seed": 2**64 - 1}, None),
    5: ({"temperature": -1}, "temperature must be a number >= 0, got -1"),
    6: ({"top_p": 0}, "top_p must be a number in (0, 1], got 0"),
    7: ({"seed": 2**70}, "seed must be an integer in [-9223372036854775808, 18446744073709551615], got 1180591620"),
    8: ({"seed": -(2**63) - 1}, "seed must be an integer in"),
    9: ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    10: ({"top_p": float("inf")}, "top_p must be a finite number, got inf"),
    11: ({"top_k": 2.5}, "top_k must be an integer >= 0, got 2.5"),
    12: ({"temperature": "0.5"}, "temperature must be a number >= 0, got '0.5'"),
    13: ({"temperature": 0.7, "seed": 42}, None),
}


def run_cli(ckpt: Path, input_file: Path, output_file: Path) -> subprocess.CompletedProcess:
    cli = [sys.executable, "-m", "tp_infer.generate", "--ckpt-path", str(ckpt), "--dtype", "fp32"]
    cli += ["--max-seq-len", "64", "--max-batch-size", "3", "--max-new-tokens", "4", *device_option(1)]
    cli += ["--input-file", str(input_file), "--output-file", str(output_file)]
    out = subprocess.run(cli, cwd=REPO, env={**os.environ, **ENV_THREADS}, capture_output=True, timeout=180)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out


def test_poison_lines_get_error_records_and_the_rest_are_answered(chat_ckpt, tmp_path):
    input_file, output_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # json.dumps writes NaN and Infinity, which Python's reader (and the job's) takes
    input_file.write_text("".join(json.dumps(raw(i, **extra)) + "\n" for i, (extra, _) in LINES.items()))
    run_cli(chat_ckpt, input_file, output_file)
    records = {r["id"]: r for r in map(json.loads, output_file.read_text().splitlines())}
    assert records.keys() == LINES.keys(), "one record per line"
    for i, (_, error) in LINES.items():
        record = records[i]
        if error is None:
            assert record["error"] is None, record
            assert [len(t["token_ids"]) for t in record["turns"]] == [4]
        else:
            assert record["error"].startswith(error) and record["turns"] == [], record
    before = output_file.read_bytes()
    again = run_cli(chat_ckpt, input_file, output_file)
    assert output_file.read_bytes() == before, "a rerun answers nothing twice and fails at no line"
    assert f"{len(LINES)} lines already answered" in again.stderr.decode()


def test_a_temperature_that_underflows_the_logits_replies_as_greedy(chat_ckpt, tmp_path):
    input_file, output_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [raw(0), raw(0, temperature=1e-300) | {"id": 1}, raw(0, temperature=5e-324, top_p=1e-50) | {"id": 2}]
    input_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_cli(chat_ckpt, input_file, output_file)
    replies = {r["id"]: r["turns"][0]["token_ids"] for r in map(json.loads, output_file.read_text().splitlines())}
    assert replies[1] == replies[0] and replies[2] == replies[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(extra, error) for extra, error in LINES.values() if error is not None]
    + [({"top_k": True}, "top_k must be an integer >= 0, got True"), ({"seed": "7"}, "seed must be an integer")],
)
def test_sampling_fields_are_checked_by_name(extra, message):
    with pytest.raises(LineError) as e:
        parse_request(raw(0, **extra), SamplingParams(), vocab_size=320, max_seq_len=64, tokenizer=None)
    assert str(e.value).startswith(message)


def batch_with_failing_turns(engine, ckpt, input_file, output_file):
    """Runs on rank 0: the batch job with a sampler that raises for top_k 13 (as the sampler once did for tiny
    top_p), and with a tokenizer, so that multi-turn text lines fail in their later turns too."""
    import tp_infer.engine.engine as engine_module
    from tp_infer.batch import run_batch
    from tp_infer.tokenizer import ChatTokenizer

    real_sample = engine_module.sample

    def sample(logits, params, generator=None, *history):
        if params.top_k == 13:
            raise RuntimeError("invalid multinomial distribution")
        return real_sample(logits, params, generator, *history)

    engine_module.sample = sample
    return run_batch(engine, ChatTokenizer(ckpt), input_file, output_file, SamplingParams(max_new_tokens=4), seed=0)


def test_a_turn_failing_while_it_runs_ends_its_line_alone(chat_ckpt, tmp_path):
    input_file, output_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [raw(i) for i in range(6)]
    lines[1]["top_k"] = 13
    lines[4] = {"id": 4, "turns_token_ids": [[5, 6], [7, 8]], "top_k": 13}
    input_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = {"max_seq_len": 64, "max_batch_size": 3}
    args = (str(chat_ckpt), str(input_file), str(output_file))
    status = run_ranks(1, serve, str(chat_ckpt), options, batch_with_failing_turns, *args)[0]
    assert status == 0
    records = {r["id"]: r for r in map(json.loads, output_file.read_text().splitlines())}
    assert records.keys() == set(range(6))
    assert records[1]["error"] == "RuntimeError: invalid multinomial distribution" and records[1]["turns"] == []
    assert records[4]["error"] == "turn 0: RuntimeError: invalid multinomial distribution"
    for i in (0, 2, 3, 5):
        assert records[i]["error"] is None and len(records[i]["turns"][0]["token_ids"]) == 4
