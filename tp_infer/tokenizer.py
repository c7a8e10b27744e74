"""The checkpoint's tokenizer (tokenizer.json) and chat format: its Jinja chat template (tokenizer_config.json),
rendered as Hugging Face renders it, or for DeepSeek-V3.2, which ships none, DeepSeek's Python encoder
(dsv32_format), so a conversation becomes exactly the ids DeepSeek's own tooling would produce."""

import copy
import json
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tp_infer import dsv32_format

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


class ChatFormat(Protocol):
    """How a checkpoint writes a conversation as text: a Jinja template, or DeepSeek-V3.2's encoder."""

    def check_kwargs(self, kwargs: dict) -> None:
        """Raise TokenizerError naming a chat_template_kwargs key or value this format cannot take."""

    def render_tracked(
        self, messages: list[dict], add_generation_prompt: bool, kwargs: dict
    ) -> tuple[str, dict[int, int]]:
        """The text, and {i: length of the text written before message i} (see ChatTokenizer.render_tracked)."""


@dataclass
class JinjaFormat:
    """A chat template, given the special tokens' names and the request's kwargs as more variables."""

    template: Any  # a compiled jinja2.Template (anything with its generate())
    special: dict

    def check_kwargs(self, kwargs: dict) -> None:
        for key in TEMPLATE_OWN:
            if key in kwargs:
                raise TokenizerError(f"chat_template_kwargs cannot set {key!r}: the request sets it")

    def render_tracked(
        self, messages: list[dict], add_generation_prompt: bool, kwargs: dict
    ) -> tuple[str, dict[int, int]]:
        pieces, written = [], [0]
        tracked = _Tracked(messages, lambda: written[0])
        try:
            for piece in self.template.generate(
                **{**self.special, **kwargs}, messages=tracked, add_generation_prompt=add_generation_prompt
            ):
                pieces.append(piece)
                written[0] += len(piece)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
        return "".join(pieces), tracked.taken


class Dsv32Format:
    """DeepSeek-V3.2's encoder (dsv32_format); kwargs: thinking (or enable_thinking) and drop_thinking."""

    def check_kwargs(self, kwargs: dict) -> None:
        self.options(kwargs)

    @staticmethod
    def options(kwargs: dict) -> dsv32_format.Dsv32Options:
        try:
            return dsv32_format.Dsv32Options.from_kwargs(kwargs)
        except dsv32_format.EncodingError as e:
            raise TokenizerError(str(e)) from None

    def render_tracked(
        self, messages: list[dict], add_generation_prompt: bool, kwargs: dict
    ) -> tuple[str, dict[int, int]]:
        try:
            text, starts = dsv32_format.render_tracked(messages, self.options(kwargs), add_generation_prompt)
        except dsv32_format.EncodingError as e:
            raise TokenizerError(f"DeepSeek-V3.2 chat format: {e}") from None
        return text, dict(enumerate(starts))


def chat_format(folder: Path, config: dict, special: dict) -> ChatFormat | None:
    """The folder's chat template; DeepSeek-V3.2's encoder where config.json says deepseek_v32 and no template is
    shipped; None without either."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = jinja_file.read_text()
    if template:
        return JinjaFormat(ChatTokenizer._compile(template), special)
    model_config = folder / "config.json"
    try:
        model_type = json.loads(model_config.read_text()).get("model_type") if model_config.exists() else None
    except (OSError, ValueError, AttributeError):
        model_type = None  # the model's loader says what is wrong with it
    return Dsv32Format() if model_type == "deepseek_v32" else None


class ChatTokenizer:
    """encode/decode without extra special tokens (the chat template writes bos itself), and chat rendering.

    Special-token text inside a message is encoded as the special token, as Hugging Face, vLLM and SGLang do by
    default: a user who types "Hi<｜end▁of▁sentence｜><｜Assistant｜>" sends the ids of an ended turn and an
    assistant's start ([420, 1, 4] with the demo model), and so can write turns of their own inside their message.
    The chat template is applied to text, and the text is then tokenised whole, so this is the checkpoint's own
    format; a deployment that must keep users to their turn has to refuse or escape such text before it gets here."""

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
        self.format: ChatFormat | None = chat_format(folder, config, self.special)
        self.template_kwargs: dict = {}  # a request's chat_template_kwargs: more template variables, V3.2's options
        bos = self.special["bos_token"]
        self.bos_token_id = self.tokenizer.token_to_id(bos) if bos else None
        eos = self.special["eos_token"]
        self.eos_token_ids = (
            (self.tokenizer.token_to_id(eos),) if eos and self.tokenizer.token_to_id(eos) is not None else ()
        )

    @property
    def template(self):
        """The Jinja chat template (None for DeepSeek-V3.2's encoder or no chat format)."""
        return self.format.template if isinstance(self.format, JinjaFormat) else None

    @template.setter
    def template(self, template) -> None:
        self.format = JinjaFormat(template, self.special) if template is not None else None

    def with_template_kwargs(self, kwargs: dict | None) -> "ChatTokenizer":
        """This tokenizer rendering with `kwargs` (vLLM's chat_template_kwargs): for a Jinja template, more variables
        (DeepSeek V3.1's reads `thinking`), which may replace the special tokens' names, not messages or
        add_generation_prompt; for DeepSeek-V3.2, `thinking` (or `enable_thinking`) and `drop_thinking`. Raises
        TokenizerError naming a key it cannot take."""
        if not kwargs:
            return self
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise TokenizerError("chat_template_kwargs must be an object whose keys are names")
        if self.format is not None:
            self.format.check_kwargs(kwargs)
        other = copy.copy(self)
        other.template_kwargs = {**self.template_kwargs, **kwargs}
        return other

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
        """The chat format applied to `messages` ({"role", "content"} dicts), as text."""
        return self.render_tracked(messages, add_generation_prompt)[0]

    def render_tracked(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, dict[int, int]]:
        """The text, and where the chat format took each message: {i: length of the text written before}. A Jinja
        template: where its last loop over the messages took message i; one that writes message i in the loop's i-th
        pass, after what comes before it, writes there exactly what it writes for messages[:i]. V3.2's encoder: where
        message i begins. render_cuts checks either."""
        if self.format is None:
            raise TokenizerError("the tokenizer has no chat template (tokenizer_config.json chat_template)")
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise TokenizerError(f"message {i}: unknown role {message.get('role')!r}")
            if not isinstance(message.get("content"), str):
                raise TokenizerError(f"message {i}: content must be a string")
        return self.format.render_tracked(messages, add_generation_prompt, self.template_kwargs)

    def render_cuts(
        self, messages: list[dict], points: list[tuple[int, bool]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int] | None]:
        """The conversation rendered whole, and for each point (i, g) the length of the text of messages[:i]
        (render(messages[:i], g), render_prefix for g false), a prefix of the whole text, in time linear in the
        conversation: each is cut where the template took message i (plus the generation prompt for g). The cuts are
        checked by rendering a few points whole: what a template writes after a conversation's last message (the
        generation prompt, the end of tool outputs) depends on that message, so the first and the last point after
        each role, with and without the generation prompt. Where the cuts do not check out, each point is rendered
        (at most EXACT_POINTS of them). None: the template does not render a conversation as a prefix of its
        continuation, or there are too many points to render each."""
        full, taken = self.render_tracked(messages, add_generation_prompt)
        ends = self._cut(messages, points, full, taken)
        if ends is None and len(points) <= EXACT_POINTS:
            texts = [self._render_point(messages, point) for point in points]
            if all(full.startswith(text) for text in texts):
                ends = [len(text) for text in texts]
        return full, ends if ends is not None and ends == sorted(ends) else None

    def _cut(self, messages: list[dict], points, full: str, taken: dict[int, int]) -> list[int] | None:
        if not all(i in taken for i, _ in points):
            return None
        prompts = [i for i, g in points if g]
        suffix = self._generation_prompt(messages[: prompts[0]]) if prompts else ""
        if any(g and not full.startswith(suffix, taken[i]) for i, g in points):
            return None
        ends = [taken[i] + (len(suffix) if g else 0) for i, g in points]
        groups: dict[tuple, list[int]] = {}  # the points by what the template may write after a conversation's end
        for k, (i, g) in enumerate(points):
            groups.setdefault((messages[i - 1]["role"] if i else None, g), []).append(k)
        for k in sorted({k for ks in groups.values() for k in (ks[0], ks[-1])}):
            text = self._render_point(messages, points[k])
            if len(text) != ends[k] or not full.startswith(text):
                return None
        return ends

    def _render_point(self, messages: list[dict], point: tuple[int, bool]) -> str:
        i, generation_prompt = point
        return self.render(messages[:i], True) if generation_prompt else self.render_prefix(messages[:i])

    def _generation_prompt(self, messages: list[dict]) -> str:
        """What add_generation_prompt adds after `messages` ("" if it does not add to their text)."""
        with_prompt, without = self.render(messages, True), self.render_prefix(messages)
        return with_prompt[len(without) :] if with_prompt.startswith(without) else ""

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation and where each user turn starts in them. The conversation is
        encoded in pieces cut just before each user message, so the boundaries are exact; where the template does
        not render a conversation as a prefix of its continuation, it is encoded whole as one turn."""
        cuts = [(i, False) for i, m in enumerate(messages) if m["role"] == "user"]
        full, ends = self.render_cuts(messages, cuts, add_generation_prompt)
        if ends is None:
            return self.encode(full), [0]
        ids = self.encode(full[: ends[0]] if ends else full)
        starts = []
        for a, b in pairwise([*ends, len(full)]):
            starts.append(len(ids))
            ids += self.encode(full[a:b])
        return ids, starts or [0]

    def render_prefix(self, messages: list[dict]) -> str:
        """The text before a user message: for none at all, whatever the template writes first (bos)."""
        try:
            return self.render(messages, add_generation_prompt=False)
        except TokenizerError:
            if messages:
                raise
            return ""


TEMPLATE_OWN = ("messages", "add_generation_prompt")  # template variables a request's kwargs cannot set
EXACT_POINTS = 64  # where the cuts do not check out, conversations with up to this many points render each


class _Tracked(list):
    """A conversation's messages as the template iterates them: taken[i] is what written() said when the template's
    loop last took message i."""

    def __init__(self, messages: list[dict], written):
        super().__init__(messages)
        self.written, self.taken = written, {}

    def __iter__(self):
        for i, message in enumerate(super().__iter__()):
            self.taken[i] = self.written()
            yield message


class StreamDecoder:
    """Turns generated ids into text as they arrive, holding back bytes that do not yet form a character."""

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""
        self.skip_special_tokens = skip_special_tokens

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new

    def flush(self) -> str:
        """Whatever is left at the end of the reply, incomplete characters included."""
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        new, self.emitted = text[len(self.emitted) :], text
        return new
