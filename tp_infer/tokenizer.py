"""The checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json), rendered as Hugging Face
renders them, so a conversation becomes exactly the ids DeepSeek's own tooling would produce."""

import json
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant", "tool")  # what a chat message's role may be


class TokenizerError(ValueError):
    """A tokenizer folder or conversation that cannot be used; the message names the culprit."""


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTokenizer:
    """encode/decode without extra special tokens (the chat template writes bos itself), and chat rendering."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{path} is missing: this checkpoint can only take raw token ids")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.special = {
            name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        self.template = self._compile(template) if template else None
        bos = self.special["bos_token"]
        self.bos_token_id = self.tokenizer.token_to_id(bos) if bos else None
        eos = self.special["eos_token"]
        self.eos_token_ids = (
            (self.tokenizer.token_to_id(eos),) if eos and self.tokenizer.token_to_id(eos) is not None else ()
        )

    @staticmethod
    def _compile(template: str) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ({"role", "content"} dicts), as text."""
        if self.template is None:
            raise TokenizerError("the tokenizer has no chat template (tokenizer_config.json chat_template)")
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise TokenizerError(f"message {i}: unknown role {message.get('role')!r}")
            if not isinstance(message.get("content"), str):
                raise TokenizerError(f"message {i}: content must be a string")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and where each user turn starts in them. The conversation is
        encoded in pieces cut just before each user message, so the boundaries are exact; where the template does
        not render a conversation as a prefix of its continuation, it is encoded whole as one turn."""
        cuts = [i for i, m in enumerate(messages) if m["role"] == "user"]
        texts = [self.render_prefix(messages[:i]) for i in cuts]
        full = self.render(messages, add_generation_prompt)
        chain = [*texts, full]
        if not all(b.startswith(a) for a, b in pairwise(chain)):
            return self.encode(full), [0]
        ids = self.encode(chain[0])
        starts = []
        for a, b in pairwise(chain):
            starts.append(len(ids))
            ids += self.encode(b[len(a) :])
        return ids, starts or [0]

    def render_prefix(self, messages: list[dict]) -> str:
        """The text before a user message: for none at all, whatever the template writes first (bos)."""
        try:
            return self.render(messages, add_generation_prompt=False)
        except TokenizerError:
            if messages:
                raise
            return ""


class StreamDecoder:
    """Turns generated ids into text as they arrive, holding back bytes that do not yet form a character."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new

    def flush(self) -> str:
        """Whatever is left at the end of the reply, incomplete characters included."""
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[len(self.emitted) :], text
        return new
