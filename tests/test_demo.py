"""The shipped demo model through the whole engine: it answers questions from earlier turns, so a wrong cache
between turns would show as wrong answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from demo_data import held_out_conversations  # noqa: E402

from tp_infer.convert import convert  # noqa: E402

CONVERSATIONS = 6


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    for world_size in (1, 2):
        convert(REPO / "demo" / "model", root, world_size)
    return root


def test_demo_recalls_facts_from_earlier_turns_at_world_size_2(demo_ckpt, tmp_path):
    conversations = held_out_conversations(CONVERSATIONS)
    lines = [
        {"id": i, "system": c["system"], "turns": [t["user"] for t in c["turns"]]} for i, c in enumerate(conversations)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "tp_infer.generate",
    ]
    cmd += ["--ckpt-path", str(demo_ckpt), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "32"]
    cmd += ["--max-seq-len", "1024"]
    cmd += ["--input-file", str(tmp_path / "in.jsonl"), "--output-file", str(tmp_path / "out.jsonl")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    asked = right = 0
    for i, c in enumerate(conversations):
        turns = records[i]["turns"]
        assert [t["computed_tokens"] < t["prompt_tokens"] for t in turns[1:]] == [True] * (len(turns) - 1)
        for q in c["questions"]:
            asked += 1
            right += turns[q]["text"].strip() == c["turns"][q]["assistant"]
    assert asked >= 15
    assert right == asked, f"{right}/{asked} questions answered from history"


def test_fp8_cache_greedy_continuations_agree(demo_ckpt):
    """Over 200+ greedy tokens of held-out conversations, an fp8 cache picks the same tokens as a bf16 cache
    at least 95% of the time (fp32 compute, so that only the cache's storage differs)."""
    import torch
    from harness import device_for

    from tp_infer.chat import Conversation
    from tp_infer.checkpoint import load_model
    from tp_infer.config import load_config
    from tp_infer.distributed import DistContext
    from tp_infer.engine.engine import Engine
    from tp_infer.engine.runner import ModelRunner
    from tp_infer.engine.sampling import SamplingParams
    from tp_infer.model.layers import TensorParallel
    from tp_infer.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(demo_ckpt)
    sampling = SamplingParams(max_new_tokens=32, eos_token_ids=tokenizer.eos_token_ids)
    generated = {}
    for kv in ("bf16", "fp8"):
        args = load_config(
            demo_ckpt / "config.json", dtype="bf16", kv_cache_dtype=kv, max_seq_len=1024, max_batch_size=2
        )
        device = torch.device(device_for(1))
        model = load_model(args, demo_ckpt, TensorParallel(), device)
        engine = Engine(ModelRunner(model, DistContext(0, 1, device), 2 * 1024 // 16))
        tokens = []
        for i, c in enumerate(held_out_conversations(3, seed=99)):
            chat = Conversation.start(engine, tokenizer, f"c{i}", c["system"])
            for t in c["turns"]:
                turn = chat.ask(t["user"], sampling)
                engine.run([turn])
                chat.record(turn)
                tokens += turn.generated
        generated[kv] = tokens
    assert len(generated["bf16"]) >= 200
    same = sum(a == b for a, b in zip(generated["bf16"], generated["fp8"], strict=False))
    print(f"fp8 cache: {same}/{len(generated['bf16'])} greedy tokens as with bf16")
    assert same / len(generated["bf16"]) >= 0.95
