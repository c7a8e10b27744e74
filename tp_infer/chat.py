"""A chat conversation on top of an engine session: messages as text for people, token ids as the model saw
them for the engine. Each user message becomes only the tokens the template adds after the last reply, so the
generated ids stay in the history exactly as they were generated."""

from dataclasses import dataclass

from tp_infer.engine.engine import Engine, Turn
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
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
