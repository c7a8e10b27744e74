"""The server's reply memory under cache_salt: a client that sends its conversation back as text finds its own replies'
generated ids (so its whole history is cached) under its own salt, and only there: another salt, or the same salt
under another API key with --salt-with-api-key, gets the conversation re-tokenised, so its prompt_tokens cannot tell
whether another tenant's replies were generated here."""

import httpx
import pytest
from test_server import MODEL, USERS, Server

from tp_infer.tokenizer import ChatTokenizer

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def server(chat_ckpt):
    s = Server(1, chat_ckpt, *(o for key in KEYS for o in ("--api-key", key)), "--salt-with-api-key")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(chat_ckpt) -> ChatTokenizer:
    return ChatTokenizer(chat_ckpt)


def usage(server: Server, messages: list[dict], salt: str, key: str = KEYS[0]) -> tuple[str, dict]:
    """The reply's text and the usage of one greedy chat request."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "cache_salt": salt}
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], response.json()["usage"]


def two_turns(server: Server, first: str, salt: str, key: str = KEYS[0]) -> tuple[list[dict], int]:
    """A first turn, then the conversation sent back with a second user message; the messages of that second
    request and the length of the history (the first turn's prompt and reply) its ids begin with."""
    messages = [{"role": "user", "content": first}]
    text, used = usage(server, messages, salt, key)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
    return messages, used["prompt_tokens"] + used["completion_tokens"]


def test_a_conversation_is_recalled_under_its_own_salt_only(server, tokenizer):
    retokenised_differs = False
    for i, first in enumerate(USERS):
        salt = f"tenant-a-{i}"  # nothing else in this module runs under it
        messages, history = two_turns(server, first, salt)
        _, own = usage(server, messages, salt)
        assert own["prompt_tokens_details"]["cached_tokens"] == history, f"{first!r}: its history not all cached"
        _, other = usage(server, messages, f"tenant-b-{i}")
        plain = len(tokenizer.encode_chat(messages)[0])
        assert other["prompt_tokens"] == plain, f"{first!r}: another salt got tenant a's reply ids"
        assert other["prompt_tokens_details"]["cached_tokens"] == 0
        retokenised_differs |= plain != own["prompt_tokens"]
    assert retokenised_differs, "no reply whose text re-tokenises differently: the test could not fail"


def test_the_same_salt_under_another_api_key_is_another_tenant(server, tokenizer):
    retokenised_differs = False
    for i, first in enumerate(USERS):
        salt = f"shared-{i}"
        messages, history = two_turns(server, first, salt, KEYS[0])
        _, own = usage(server, messages, salt, KEYS[0])
        assert own["prompt_tokens_details"]["cached_tokens"] == history, f"{first!r}: its history not all cached"
        _, other = usage(server, messages, salt, KEYS[1])
        plain = len(tokenizer.encode_chat(messages)[0])
        assert other["prompt_tokens"] == plain, f"{first!r}: key-two got key-one's reply ids"
        retokenised_differs |= plain != own["prompt_tokens"]
    assert retokenised_differs, "no reply whose text re-tokenises differently: the test could not fail"
