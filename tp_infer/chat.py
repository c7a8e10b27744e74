"""A chat conversation on top of an engine session: messages as text for people, token ids as the model saw
them for the engine. Each user message becomes only the tokens the template adds after the last reply, so the
generated ids stay in the history exactly as they were generated."""

import hashlib
import json
import sys
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tp_infer.engine.engine import Engine, Turn
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.kv.tiers import salted_root
from tp_infer.private_files import (
    UnsafePathError,
    authenticator,
    folder_secret,
    read_private,
    same_code,
    write_private,
)
from tp_infer.tokenizer import ChatTokenizer


@dataclass
class Conversation:
    engine: Engine
    tokenizer: ChatTokenizer
    session: Session
    messages: list[dict]
    text: str  # the rendered conversation up to the end of the last reply (its stop token excluded)
    stop_token: int | None = None  # the token that ended the last reply, already in the history
    asked: tuple[str, str] | None = None  # the user message in flight and the text rendered with it

    @classmethod
    def start(cls, engine: Engine, tokenizer: ChatTokenizer, id: str, system: str | None = None, seed: int = 0):
        messages = [{"role": "system", "content": system}] if system else []
        text = tokenizer.render_prefix(messages)
        session = Session(id, seed=seed, tokens=tokenizer.encode(text))
        return cls(engine, tokenizer, session, messages, text)

    @classmethod
    def restore(cls, engine: Engine, tokenizer: ChatTokenizer, id: str, saved: dict, seed: int = 0):
        """From save(): the messages and the exact token ids; the cache is recomputed on the next turn."""
        messages = list(saved["messages"])
        session = Session(id, seed=seed, tokens=list(saved["token_ids"]), turn_starts=list(saved["turn_starts"]))
        if messages and messages[-1]["role"] == "assistant":
            text = tokenizer.render(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
        else:
            text = tokenizer.render_prefix(messages)
        stops = set(tokenizer.eos_token_ids)
        stop_token = session.tokens[-1] if session.tokens and session.tokens[-1] in stops else None
        return cls(engine, tokenizer, session, messages, text, stop_token)

    def save(self) -> dict:
        return {"messages": self.messages, "token_ids": self.session.tokens, "turn_starts": self.session.turn_starts}

    def ask(self, content: str, sampling: SamplingParams, on_token=None) -> Turn:
        """Submit a user message; run the engine, then call record() with the finished turn."""
        messages = [*self.messages, {"role": "user", "content": content}]
        full = self.tokenizer.render(messages, add_generation_prompt=True)
        if full.startswith(self.text):
            new = self.tokenizer.encode(full[len(self.text) :])
            if self.stop_token is not None and new[:1] == [self.stop_token]:
                new = new[1:]  # the reply's own stop token is already in the history
            turn = self.engine.append_turn(self.session, new, sampling, on_token)
        else:  # a template that rewrites earlier turns: submit it whole, the cache keeps the common prefix
            ids, starts = self.tokenizer.encode_chat(messages)
            turn = self.engine.submit(self.session, ids, starts, sampling, on_token)
        self.asked = (content, full)
        return turn

    def record(self, turn: Turn) -> str:
        """Add the user message and the reply to the messages; returns the reply text."""
        content, full = self.asked
        ids = turn.generated
        self.stop_token = ids[-1] if ids and turn.finish_reason == "stop" else None
        reply = self.tokenizer.decode(ids[:-1] if self.stop_token is not None else ids)
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
        self.text = full + reply
        return reply


def reply_text(tokenizer: ChatTokenizer, ids: list[int], finish_reason: str | None, sampling: SamplingParams) -> str:
    """A finished reply's text as `sampling` shows it: without the stop token that ended it (unless
    include_stop_str_in_output), special tokens' text as skip_special_tokens says."""
    if finish_reason == "stop" and ids and not sampling.shows(ids[-1], len(ids) - 1):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=sampling.skip_special_tokens)


class ReplyMemory:
    """The exact ids of replies generated here, by the ids that preceded them (and the request's cache_salt: one
    tenant's replies are never recalled for another). A conversation sent back as text (a `messages` batch line, an
    API request) then gets its replies' own ids instead of a re-tokenisation, which need not be the same, and so
    finds its whole history in the cache. Its ids are the model's, in [0, the model's vocab_size): those remembered
    here were generated, those loaded from a file are range-checked there. A checkpoint's embedding may have more rows
    than its tokenizer has tokens: an id the tokenizer lacks is still one the model generated."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self.replies: OrderedDict[bytes, tuple[str, list[int]]] = OrderedDict()

    @staticmethod
    def key(prompt: list[int], cache_salt: str | bytes | None = None) -> bytes:
        """The prompt's digest; a salted prompt's is that of the salt's namespace (tiers.salted_root)."""
        running = ReplyMemory.running_key(cache_salt)
        running.update(array("q", prompt).tobytes())
        return running.digest()

    @staticmethod
    def running_key(cache_salt: str | bytes | None = None):
        """key() of ids that grow: update it with array("q", new_ids).tobytes(); its digest() is key(ids)."""
        return hashlib.blake2b(b"" if cache_salt is None else salted_root(b"", cache_salt), digest_size=16)

    def remember(self, prompt: list[int], text: str, ids: list[int], cache_salt: str | bytes | None = None) -> None:
        """`ids` (its stop token included, if it stopped) were generated after `prompt` and read as `text`."""
        key = self.key(prompt, cache_salt)
        self.replies[key] = (text, list(ids))
        self.replies.move_to_end(key)
        while len(self.replies) > self.capacity:
            self.replies.popitem(last=False)

    def recall(self, prompt: list[int] | bytes, text: str, cache_salt: str | bytes | None = None) -> list[int] | None:
        """The ids remembered after `prompt` (the ids, or their key()) if they read as `text`."""
        found = self.replies.get(prompt if isinstance(prompt, bytes) else self.key(prompt, cache_salt))
        return found[1] if found is not None and found[0] == text else None

    # Kept beside the disk tier's files, so that a restarted job or server finds the histories it sent back as text:
    # JSON lines {"key", "text", "ids", "mac"}, oldest first; "mac" authenticates the record under the folder's
    # secret key (private_files.folder_secret), so that a record this program did not write is never used.
    @classmethod
    def load(cls, path: Path, *, vocab_size: int, capacity: int = 65536) -> "ReplyMemory":
        """What save() wrote (nothing if there is no such file). vocab_size: the model's (its embedding's rows, not
        the tokenizer's). A file that is a link, not this user's, or unreadable is not used; records that do not
        parse, were not written by this program or hold ids outside [0, vocab_size) are dropped: one line on stderr
        either way."""
        memory = cls(capacity)
        try:
            content = read_private(path).decode(errors="replace")
            secret = folder_secret(path.parent)
        except FileNotFoundError:
            return memory
        except (OSError, UnsafePathError) as e:
            warn(f"reply memory {path} not used: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
            return memory
        dropped = Counter()
        for line in content.splitlines():
            try:
                record = json.loads(line)
                key, text, ids = bytes.fromhex(record["key"]), record["text"], record["ids"]
                mac = record.get("mac")
            except (ValueError, KeyError, TypeError):
                dropped["that do not parse"] += 1
                continue
            if not same_code(mac, record_mac(secret, key, text, ids)):
                dropped["not written by this program"] += 1
            elif not isinstance(text, str) or not isinstance(ids, list) or not valid_ids(ids, vocab_size):
                dropped[f"with token ids outside the vocabulary [0, {vocab_size})"] += 1
            else:
                memory.replies[key] = (text, ids)
        if dropped:
            n = sum(dropped.values())
            why = ", ".join(f"{count} {reason}" for reason, count in dropped.items())
            warn(f"reply memory {path}: dropped {n} record{'s' if n > 1 else ''} ({why})")
        while len(memory.replies) > capacity:
            memory.replies.popitem(last=False)
        return memory

    def save(self, path: Path) -> None:
        """Write every remembered reply (a temporary file renamed into place, private to the user)."""
        secret = folder_secret(path.parent)
        lines = [
            json.dumps({"key": k.hex(), "text": t, "ids": ids, "mac": record_mac(secret, k, t, ids)}) + "\n"
            for k, (t, ids) in self.replies.items()
        ]
        write_private(path, "".join(lines).encode())


def record_mac(secret: bytes, key: bytes, text, ids) -> str:
    """The authentication code of one remembered reply: HMAC-SHA256 of its JSON, hex."""
    h = authenticator(secret)
    h.update(json.dumps([key.hex(), text, ids]).encode())
    return h.hexdigest()


def valid_ids(ids: list, vocab_size: int) -> bool:
    """Integers (not booleans) in [0, vocab_size)."""
    return all(type(t) is int and 0 <= t < vocab_size for t in ids)


def warn(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def encode_messages(
    tokenizer: ChatTokenizer,
    messages: list[dict],
    memory: ReplyMemory | None = None,
    cache_salt: str | bytes | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation (with the generation prompt) and where each user turn starts, as
    ChatTokenizer.encode_chat, except that an assistant message this process generated after the same ids (for the
    same cache_salt) gets its generated ids back."""
    if memory is None or not any(m["role"] == "assistant" for m in messages):
        return tokenizer.encode_chat(messages)
    # the text before each user message, and before each assistant message's content: prefixes of the whole text
    points = [(i, m["role"] == "assistant") for i, m in enumerate(messages) if m["role"] in ("user", "assistant")]
    full, ends = tokenizer.render_cuts(messages, points)
    if ends is None:
        return tokenizer.encode_chat(messages)
    ids, starts, done, stop = [], [], 0, None  # done: the length of the text ids hold
    running = memory.running_key(cache_salt)  # key(ids), kept as ids grow: each recall costs its new ids only
    for (i, reply), end in zip([*points, (len(messages), False)], [*ends, len(full)], strict=True):
        if end < done:
            return tokenizer.encode_chat(messages)  # a remembered reply the template renders differently
        new = tokenizer.encode(full[done:end])
        if stop is not None and new[:1] == [stop]:
            new = new[1:]  # the reply's own stop token is already there
        ids += new
        running.update(array("q", new).tobytes())
        done, stop = end, None
        if not reply:
            starts.append(len(ids))
            continue
        recalled = memory.recall(running.digest(), messages[i]["content"])
        if recalled is not None:
            if not full.startswith(messages[i]["content"], done):
                return tokenizer.encode_chat(messages)
            ids += recalled
            running.update(array("q", recalled).tobytes())
            done += len(messages[i]["content"])
            stop = recalled[-1] if recalled and recalled[-1] in tokenizer.eos_token_ids else None
    return ids, starts[:-1] or [0]
