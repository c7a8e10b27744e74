"""The console's /load takes back what its /save wrote: the saved ids are the model's, and a reply may hold ids the
tokenizer lacks (the test checkpoint's embedding has 320 rows, its tokenizer 313 tokens), so /load checks them
against the model's vocabulary, which still refuses an id past it in one line."""

import json

from checkpoints import CHAT_VOCAB
from test_console import console
from test_server import USERS

from tp_infer.tokenizer import ChatTokenizer


def test_load_takes_back_a_saved_conversation_whose_replies_hold_ids_the_tokenizer_lacks(chat_ckpt, tmp_path):
    saved, beyond = tmp_path / "saved.json", tmp_path / "beyond.json"
    beyond.write_text(json.dumps({"messages": [], "token_ids": [0, CHAT_VOCAB], "turn_starts": [0]}))
    lines = [*USERS, f"/save {saved}", f"/load {beyond}", f"/load {saved}", "Bye", "/exit"]
    run = console(chat_ckpt, lines, world_size=1)
    assert run.returncode == 0, run.stderr
    conversation = json.loads(saved.read_text())
    n = len(conversation["token_ids"])
    assert [t for t in conversation["token_ids"] if t >= ChatTokenizer(chat_ckpt).vocab_size], (
        "no reply holds an id the tokenizer lacks: the test could not fail"
    )
    refusals = [line for line in run.stdout.splitlines() if line.startswith("(cannot load")]
    assert refusals == [f"(cannot load {beyond}: token_ids[1] = {CHAT_VOCAB} is not a token id in [0, {CHAT_VOCAB}))"]
    assert f"(loaded {len(conversation['messages'])} messages, {n} tokens from {saved})" in run.stdout, run.stdout
    stats = [line for line in run.stdout.splitlines() if line.startswith("[reused")]
    assert len(stats) == len(USERS) + 1 and stats[-1].startswith(f"[reused {n} "), "the loaded history is reused whole"
