"""Rendering benchmark: the time to turn a chat conversation into token ids and turn starts, by its length.

    python scripts/bench_render.py [--tokenizer demo/model] [--messages 1000,10000] [--repeats 3]

A conversation of a system prompt and alternating user and assistant messages ("message k"), through
ChatTokenizer.encode_chat (what a `messages` batch line and an API request without remembered replies take) and
chat.encode_messages with an empty reply memory; the best of --repeats runs of each, and the time per message. Linear
rendering keeps the time per message flat as conversations grow (before issue 28, 10,000 messages took about a
minute). Progress goes to stderr, the table to stdout.
"""

import time
from pathlib import Path

import click

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model"


def conversation(n: int) -> list[dict]:
    turns = [{"role": ("user", "assistant")[k % 2], "content": f"message {k}"} for k in range(n)]
    return [{"role": "system", "content": "Be brief."}, *turns]


def best_time(repeats: int, fn, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


@click.command()
@click.option("--tokenizer", "folder", default=str(DEMO), show_default=True, help="A folder with tokenizer.json.")
@click.option("--messages", default="1000,10000", show_default=True, help="Conversation lengths, comma-separated.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
def main(folder: str, messages: str, repeats: int) -> None:
    tokenizer = ChatTokenizer(folder)
    print(f"{'messages':>9} {'encode_chat s':>14} {'us/message':>11} {'encode_messages s':>18} {'us/message':>11}")
    for n in (int(x) for x in messages.split(",")):
        click.echo(f"rendering {n} messages", err=True)
        chat = conversation(n)
        t1 = best_time(repeats, tokenizer.encode_chat, chat)
        t2 = best_time(repeats, encode_messages, tokenizer, chat, ReplyMemory())
        print(f"{n:>9} {t1:>14.3f} {t1 / n * 1e6:>11.1f} {t2:>18.3f} {t2 / n * 1e6:>11.1f}")


if __name__ == "__main__":
    main()
