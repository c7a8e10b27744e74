"""Recall accuracy of the demo model through the engine: held-out conversations as batch jobs at world size 2,
with the cache reused between turns, with every turn recomputed, and with the history withheld.

    python scripts/eval_demo.py [--model demo/model] [--conversations 200] [--world-size 2]

A question counts as answered when the reply is exactly the answer sentence. With history withheld, each question is
asked alone (system prompt and question only): the model can only guess, so that accuracy shows chance level.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from demo_data import held_out_conversations, to_messages

from tp_infer.convert import convert

REPO = Path(__file__).resolve().parent.parent


def run_batch(ckpt: Path, lines: list[dict], out: Path, world_size: int, extra: list[str]) -> dict[str, dict]:
    """The batch job over `lines` through the real command line; its records by id."""
    src = out.with_suffix(".in.jsonl")
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
    cmd += ["-m", "tp_infer.generate", "--ckpt-path", str(ckpt), "--input-file", str(src), "--output-file", str(out)]
    cmd += ["--device", "cpu", "--max-new-tokens", "32", "--max-batch-size", "8", "--max-seq-len", "1024", *extra]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def evaluate(model: Path, conversations: int, world_size: int, work: Path) -> dict[str, float]:
    ckpt = work / f"mp{world_size}"
    if not (ckpt / f"model0-mp{world_size}.safetensors").exists():
        convert(model, ckpt, world_size)
    held_out = held_out_conversations(conversations)
    multi_turn = [
        {"id": f"c{i}", "system": c["system"], "turns": [t["user"] for t in c["turns"]]} for i, c in enumerate(held_out)
    ]
    alone = [
        {"id": f"c{i}-q{q}", "messages": to_messages(c, upto=q, history=False)}
        for i, c in enumerate(held_out)
        for q in c["questions"]
    ]
    results = {}
    for name, lines, extra in (
        ("reuse on", multi_turn, []),
        ("reuse off", multi_turn, ["--no-reuse"]),
        ("history withheld", alone, []),
    ):
        records = run_batch(ckpt, lines, work / f"{name.replace(' ', '_')}.jsonl", world_size, extra)
        right = total = 0
        for i, c in enumerate(held_out):
            for q in c["questions"]:
                if name == "history withheld":
                    reply = records[f"c{i}-q{q}"]["turns"][0]["text"]
                else:
                    reply = records[f"c{i}"]["turns"][q]["text"]
                right += reply.strip() == c["turns"][q]["assistant"]
                total += 1
        results[name] = right / total
        print(f"{name}: {right}/{total} = {right / total:.1%}", flush=True)
    return results


@click.command()
@click.option("--model", default=str(REPO / "demo" / "model"), show_default=True, help="Hugging Face demo folder.")
@click.option("--conversations", default=200, show_default=True, help="Held-out conversations.")
@click.option("--world-size", default=2, show_default=True, help="Ranks of the batch jobs.")
def main(model: str, conversations: int, world_size: int) -> None:
    """Recall accuracy with reuse on, reuse off, and history withheld."""
    with tempfile.TemporaryDirectory() as work:
        evaluate(Path(model), conversations, world_size, Path(work))


if __name__ == "__main__":
    main()
