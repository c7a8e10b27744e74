"""The reply memory's ids are the model's: a checkpoint's embedding may have more rows than its tokenizer has tokens
(the test checkpoint: 320 rows, 313 tokens), and a reply holding an id the tokenizer lacks is still recalled, so a
conversation sent back as text keeps its generated ids (and its cached history). The range check is the model's
vocabulary, at load, where ids come from outside."""

from pathlib import Path

import pytest
from checkpoints import CHAT_VOCAB, write_tokenizer

from tp_infer.chat import ReplyMemory, encode_messages
from tp_infer.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ChatTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    tokenizer = ChatTokenizer(folder)
    assert tokenizer.vocab_size < CHAT_VOCAB, "the case under test: fewer tokens than the model has rows"
    return tokenizer


def conversation(tokenizer: ChatTokenizer, memory: ReplyMemory, reply_ids: list[int], salt=None) -> tuple:
    """A first turn answered with reply_ids (then the stop token), remembered as the server and batch job do; the
    conversation sent back as text with a second user message, and the ids of its first turn."""
    first = [{"role": "user", "content": "Hello there,"}]
    prompt, _ = encode_messages(tokenizer, first, memory, salt)
    generated = [*reply_ids, *tokenizer.eos_token_ids]
    text = tokenizer.decode(reply_ids)
    memory.remember(prompt, text, generated, cache_salt=salt)
    messages = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": "My name is Ada"}]
    return messages, prompt + generated


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_a_reply_with_ids_the_tokenizer_lacks_is_recalled(tokenizer, salt):
    """The regression: ids in [tokenizer's vocabulary, model's) were taken for out-of-range and the reply forgotten,
    so the history was re-tokenised and a server's replies stopped matching the batch job's from the third turn."""
    memory = ReplyMemory()
    beyond = list(range(tokenizer.vocab_size, CHAT_VOCAB))
    messages, history = conversation(tokenizer, memory, [100, *beyond, 101], salt)
    ids, starts = encode_messages(tokenizer, messages, memory, salt)
    assert ids[: len(history)] == history and starts[-1] == len(history)
    assert len(memory.replies) == 1, "nothing forgotten"


def test_a_reply_is_recalled_for_its_own_salt_only(tokenizer):
    memory = ReplyMemory()
    messages, history = conversation(tokenizer, memory, [100, CHAT_VOCAB - 1], salt="tenant-a")
    assert encode_messages(tokenizer, messages, memory, "tenant-b")[0][: len(history)] != history
    assert encode_messages(tokenizer, messages, memory)[0][: len(history)] != history


def test_load_keeps_ids_the_tokenizer_lacks_and_drops_those_the_model_lacks(tokenizer, tmp_path: Path, capsys):
    memory = ReplyMemory()
    memory.remember([5, 6], "in", [CHAT_VOCAB - 1, 1])
    memory.remember([7], "out", [CHAT_VOCAB, 1])
    memory.save(tmp_path / "replies.jsonl")
    loaded = ReplyMemory.load(tmp_path / "replies.jsonl", vocab_size=CHAT_VOCAB)
    assert loaded.recall([5, 6], "in") == [CHAT_VOCAB - 1, 1] and loaded.recall([7], "out") is None
    (line,) = capsys.readouterr().err.splitlines()
    assert f"dropped 1 record (1 with token ids outside the vocabulary [0, {CHAT_VOCAB}))" in line, line
