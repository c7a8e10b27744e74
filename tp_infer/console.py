"""The interactive console on rank 0: one conversation, replies streamed as they are generated."""

import json
import signal
import sys
from pathlib import Path
from typing import TextIO

from tp_infer.chat import Conversation
from tp_infer.engine.engine import Engine, TurnRefused
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Totals
from tp_infer.tokenizer import ROLES, ChatTokenizer, StreamDecoder, TokenizerError

HELP = """commands:
  /help          this text
  /exit          leave (end of input does the same)
  /clear         start a new conversation (the system prompt stays)
  /system TEXT   start a new conversation with TEXT as its system prompt
  /stats         reuse statistics of this conversation and of the whole engine
  /save FILE     write the conversation (messages and exact token ids) as JSON
  /load FILE     continue a saved conversation (what the cache still holds of it is reused)
  /think on|off|keep
                 thinking mode from the next turn (chat_template_kwargs thinking); keep: on, and earlier turns keep
                 their reasoning (drop_thinking false), so each turn reuses the whole history
Ctrl-C stops a reply (what was generated stays in the history); at the prompt it exits."""


def format_totals(name: str, t: Totals) -> str:
    share = t.reused_tokens / t.prompt_tokens if t.prompt_tokens else 0.0
    restored = f" (host {t.host_tokens}, disk {t.disk_tokens})" if t.host_tokens or t.disk_tokens else ""
    return (
        f"{name}: {t.turns} turns, prompt {t.prompt_tokens} tokens, reused {t.reused_tokens} ({share:.0%}){restored}, "
        f"computed {t.computed_tokens}, generated {t.generated_tokens}"
    )


class Console:
    def __init__(
        self,
        engine: Engine,
        tokenizer: ChatTokenizer,
        sampling: SamplingParams,
        system: str | None = None,
        show_stats: bool = True,
        seed: int = 0,
        stdin=None,
        stdout: TextIO | None = None,
    ):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.plain_tokenizer = tokenizer  # without /think's kwargs
        self.show_stats, self.seed = show_stats, seed
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.out = stdout or sys.stdout
        self.interactive = hasattr(self.stdin, "isatty") and self.stdin.isatty()
        self.interrupted = False
        self.conversations = 0
        self.system = system
        self.conversation = self.new_conversation()

    def new_conversation(self) -> Conversation:
        if getattr(self, "conversation", None) is not None:
            self.engine.close_session(self.conversation.session)
        self.conversations += 1
        return Conversation.start(self.engine, self.tokenizer, f"console-{self.conversations}", self.system, self.seed)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self) -> None:
        """Read lines until /exit, end of input, or Ctrl-C at the prompt."""
        while True:
            line = self.read_line()
            if line is None:
                return
            if line.startswith("/"):
                if not self.command(line):
                    return
            elif line.strip():
                self.reply(line)
            else:
                self.say("(empty message ignored; /help lists the commands)")

    def read_line(self) -> str | None:
        while True:
            if self.interactive:
                self.out.write(">>> ")
                self.out.flush()
            try:
                raw = self.stdin.readline()
            except KeyboardInterrupt:
                self.out.write("\n")
                return None
            if not raw:
                return None
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                self.say(f"(input is not valid UTF-8 at byte {e.start}; line ignored)")
                continue
            if not self.interactive:  # piped input: echo it, so the transcript reads as a conversation
                self.say(f">>> {line}")
            return line

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True

    def reply(self, content: str) -> None:
        stream = StreamDecoder(self.tokenizer)
        # from the line's arrival, Ctrl-C stops the reply at a step boundary: a Ctrl-C while the turn is still being
        # rendered would otherwise escape the reply
        self.interrupted = False
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            try:
                turn = self.conversation.ask(content, self.sampling, lambda t: self._write(stream.push(t)))
            except (TurnRefused, TokenizerError) as e:
                self.say(f"(turn refused: {e})")
                return
            self.engine.run([turn], interrupted=lambda: self.interrupted)
        finally:
            signal.signal(signal.SIGINT, previous)
        if not turn.done:
            self.engine.cancel(turn)
        self.conversation.record(turn)
        self._write(stream.flush())
        self.out.write("\n")
        if turn.finish_reason == "cancelled":
            self.say("(reply stopped)")
        elif turn.finish_reason == "error":
            self.say(f"(reply failed: {turn.error})")
        if self.show_stats:
            s = turn.stats
            restored = "".join(
                f" · {n} from {tier}" for n, tier in ((s.host_tokens, "host"), (s.disk_tokens, "disk")) if n
            )
            self.say(
                f"[reused {s.reused_tokens}{restored} · computed {s.computed_tokens} · generated {s.generated_tokens}"
                f" · ttft {s.ttft_s:.2f} s · {s.decode_tokens_per_s:.1f} tok/s]"
            )

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/exit":
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/clear":
            self.conversation = self.new_conversation()
            self.say("(new conversation)")
        elif name == "/system":
            if not arg:
                self.say("(usage: /system TEXT)")
                return True
            self.system = arg
            self.conversation = self.new_conversation()
            self.say("(new conversation with this system prompt)")
        elif name == "/stats":
            self.say(format_totals("conversation", self.conversation.session.totals))
            self.say(format_totals("engine", self.engine.totals))
            self.say(self.engine.cache_usage().describe())
        elif name == "/think":
            self.think(arg)
        elif name in ("/save", "/load"):
            if not arg:
                self.say(f"(usage: {name} FILE)")
            else:
                self.save(arg) if name == "/save" else self.load(arg)
        else:
            self.say(f"(unknown command {name}; /help lists the commands)")
        return True

    def think(self, mode: str) -> None:
        """Render from the next turn on in thinking mode (on), without it (off), or in it with earlier turns' reasoning
        kept (keep), as chat_template_kwargs would."""
        kwargs = THINK_MODES.get(mode)
        if kwargs is None:
            self.say("(usage: /think on|off|keep)")
            return
        try:
            self.tokenizer = self.plain_tokenizer.with_template_kwargs(kwargs)
        except TokenizerError as e:
            self.say(f"(cannot change thinking mode: {e})")
            return
        self.conversation.tokenizer = self.tokenizer
        self.say(f"(thinking {mode} from the next turn)")

    def save(self, path: str) -> None:
        try:
            Path(path).write_text(json.dumps(self.conversation.save(), ensure_ascii=False) + "\n")
        except OSError as e:
            self.say(f"(cannot save to {path}: {e.strerror})")
            return
        self.say(f"(saved {len(self.conversation.messages)} messages to {path})")

    def load(self, path: str) -> None:
        """Continue a saved conversation; a file that is not one (or that the chat template refuses) is refused
        whole, with one line, and the current conversation goes on."""
        try:
            saved = json.loads(Path(path).read_text())
            check_saved(saved, self.engine.runner.model.args.vocab_size)  # replies hold ids past the tokenizer's
            restored = Conversation.restore(
                self.engine, self.tokenizer, f"console-{self.conversations + 1}", saved, self.seed
            )
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to read
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            self.say(f"(cannot load {path}: {reason})")
            return
        self.engine.close_session(self.conversation.session)
        self.conversations += 1
        self.conversation = restored
        self.say(f"(loaded {len(saved['messages'])} messages, {len(saved['token_ids'])} tokens from {path})")


THINK_MODES = {"on": {"thinking": True}, "off": {"thinking": False}, "keep": {"thinking": True, "drop_thinking": False}}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_saved(saved, vocab_size: int) -> None:
    """Refuse a saved conversation that is not one, naming what is wrong: {"messages": [{"role", "content"}, ...],
    "token_ids": [ids in the vocabulary], "turn_starts": [non-decreasing offsets into token_ids]}."""
    if not isinstance(saved, dict) or not {"messages", "token_ids", "turn_starts"} <= saved.keys():
        raise ValueError("not a saved conversation (needs messages, token_ids, turn_starts)")
    messages, ids, starts = saved["messages"], saved["token_ids"], saved["turn_starts"]
    for name, value in (("messages", messages), ("token_ids", ids), ("turn_starts", starts)):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a {{role, content}} object with string content")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {m.get('role')!r} (allowed: {', '.join(ROLES)})")
    bad = next((i for i, t in enumerate(ids) if not (_is_int(t) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise ValueError(f"token_ids[{bad}] = {ids[bad]!r} is not a token id in [0, {vocab_size})")
    previous = 0
    for i, start in enumerate(starts):
        if not (_is_int(start) and previous <= start <= len(ids)):
            raise ValueError(
                f"turn_starts[{i}] = {start!r} must be an integer offset into token_ids, in [{previous}, {len(ids)}]"
            )
        previous = start
