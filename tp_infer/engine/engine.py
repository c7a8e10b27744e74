"""The multi-turn engine on rank 0: sessions keep their KV cache between turns; each turn prefills only what the
cache does not hold (longest common prefix, token-granular); turns of many sessions share batched forwards."""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tp_infer.engine.runner import ModelRunner, StepPlan
from tp_infer.engine.sampling import SamplingParams, sample
from tp_infer.engine.session import Session, Totals, TurnStats


class TurnRefused(ValueError):
    """A turn that cannot be run (it cannot fit in max_seq_len); its session is left as it was."""


@dataclass
class Turn:
    """One reply being generated. `pending` are tokens to feed at cache position `pos`."""

    session: Session
    prompt: list[int]
    turn_starts: list[int]
    sampling: SamplingParams
    on_token: Callable[[int], None] | None = None
    stats: TurnStats = field(default_factory=TurnStats)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    pending: list[int] = field(default_factory=list)
    pos: int = 0
    prefilling: bool = True
    closing: bool = False  # the last token is being written to the cache; nothing more is sampled
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Schedules turns over max_batch_size cache slots. With reuse=False every turn re-prefills its whole
    conversation, as DeepSeek's reference does, for comparison."""

    def __init__(self, runner: ModelRunner, reuse: bool = True, prefill_chunk: int = 2048):
        args = runner.model.args
        self.runner, self.reuse, self.prefill_chunk = runner, reuse, prefill_chunk
        self.max_seq_len, self.num_slots = args.max_seq_len, args.max_batch_size
        self.slot_owner: list[Session | None] = [None] * self.num_slots
        self.queue: deque[Turn] = deque()
        self.active: list[Turn] = []
        self.totals = Totals()
        self.clock = 0
        self.generators: dict[str, torch.Generator] = {}

    # ---- submitting turns -------------------------------------------------------------------------------
    def append_turn(self, session: Session, new_tokens: list[int], sampling: SamplingParams, on_token=None) -> Turn:
        """A new turn made of `new_tokens` appended to the conversation (console, multi-turn batch)."""
        prompt = session.tokens + list(new_tokens)
        return self.submit(session, prompt, [*session.turn_starts, len(session.tokens)], sampling, on_token)

    def submit(
        self,
        session: Session,
        conversation: list[int],
        turn_starts: list[int] | None,
        sampling: SamplingParams,
        on_token: Callable[[int], None] | None = None,
    ) -> Turn:
        """A turn given as the whole conversation; the cache keeps its longest common prefix with it. turn_starts
        marks where turns begin (for the overflow policy); None: the conversation is one turn."""
        if session.busy:
            raise TurnRefused(f"session {session.id} already has a turn in progress")
        if not conversation:
            raise TurnRefused("a turn needs at least one token")
        starts = list(turn_starts) if turn_starts else [0]
        prompt, starts, dropped = self.fit(conversation, starts, sampling.max_new_tokens)
        turn = Turn(session, prompt, starts, sampling, on_token)
        turn.stats.dropped_tokens = dropped
        session.busy = True
        self.queue.append(turn)
        return turn

    def fit(self, tokens: list[int], starts: list[int], max_new_tokens: int) -> tuple[list[int], list[int], int]:
        """Overflow policy: while the prompt plus max_new_tokens exceeds max_seq_len, drop the oldest whole turn
        after the system prompt. Refuses a turn that does not fit even alone with the system prompt."""
        dropped = 0
        while len(tokens) + max_new_tokens > self.max_seq_len and len(starts) > 1:
            cut = starts[1] - starts[0]
            tokens = tokens[: starts[0]] + tokens[starts[1] :]
            starts = [s - cut for s in starts[1:]]
            dropped += cut
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise TurnRefused(
                f"turn needs {len(tokens)} prompt tokens + max_new_tokens {max_new_tokens} = "
                f"{len(tokens) + max_new_tokens}, more than max_seq_len {self.max_seq_len}"
            )
        return tokens, starts, dropped

    # ---- running ----------------------------------------------------------------------------------------
    def run(self, turns: list[Turn] | None = None, interrupted: Callable[[], bool] | None = None) -> None:
        """Step until the given turns (default: all submitted work) are done, or until interrupted() says so
        (checked between steps, so every rank stops at the same step boundary)."""
        while self.queue or self.active:
            if turns is not None and all(t.done for t in turns):
                return
            if interrupted is not None and interrupted():
                return
            self.step()

    def generate(self, session: Session, new_tokens: list[int], sampling: SamplingParams, on_token=None) -> Turn:
        """Append a turn and run it to the end."""
        turn = self.append_turn(session, new_tokens, sampling, on_token)
        self.run([turn])
        return turn

    def step(self) -> list[Turn]:
        """Admit queued turns into free slots, run one forward, sample; returns the turns that ended."""
        self.admit()
        prefill = [t for t in self.active if t.prefilling]
        rows = prefill or self.active
        if not rows:
            return []
        budget, plan_rows, fed = self.prefill_chunk, [], []
        for turn in rows:
            take = turn.pending
            if turn.prefilling:
                if budget <= 0:
                    break
                take = turn.pending[:budget]
                budget -= len(take)
            plan_rows.append((turn.session.slot, turn.pos, take))
            fed.append((turn, len(take)))
        logits = self.runner.forward(StepPlan.from_rows(plan_rows))
        ended = []
        for (turn, n), row_logits in zip(fed, logits, strict=True):
            turn.pending = turn.pending[n:]
            turn.pos += n
            turn.session.cached = turn.pos
            if turn.pending:
                continue  # a prompt longer than one chunk goes on in the next step
            if turn.closing:
                self.finish(turn)
                ended.append(turn)
                continue
            turn.prefilling = False
            self.accept(turn, sample(row_logits, turn.sampling, self.generator(turn.session)))
            if turn.finish_reason and not turn.pending:
                self.finish(turn)
                ended.append(turn)
        return ended

    def admit(self) -> None:
        waiting = deque()
        while self.queue:
            turn = self.queue.popleft()
            if len(self.active) >= self.num_slots or not self.take_slot(turn.session):
                waiting.append(turn)
                continue
            self.start(turn)
        self.queue = waiting

    def take_slot(self, session: Session) -> bool:
        """Give the session a slot: its own, a free one, or the least recently used idle session's."""
        if session.slot is not None:
            return True
        if None in self.slot_owner:
            slot = self.slot_owner.index(None)
        else:
            idle = [s for s in self.slot_owner if not any(t.session is s for t in self.active)]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.last_used)
            slot = victim.slot
            victim.release_cache()
        self.slot_owner[slot] = session
        session.slot, session.cached = slot, 0
        return True

    def start(self, turn: Turn) -> None:
        session, prompt = turn.session, turn.prompt
        reused = common_prefix(session.tokens[: session.cached], prompt) if self.reuse else 0
        reused = min(reused, len(prompt) - 1)  # the last prompt token is always fed: its logits pick the reply
        session.tokens, session.turn_starts, session.cached = list(prompt), turn.turn_starts, reused
        self.clock += 1
        session.last_used = self.clock
        turn.pending, turn.pos = prompt[reused:], reused
        s = turn.stats
        s.prompt_tokens, s.reused_tokens, s.computed_tokens = len(prompt), reused, len(prompt) - reused
        s.prev_pos, s.end_pos = reused, len(prompt)
        self.active.append(turn)

    def accept(self, turn: Turn, token: int) -> None:
        now = time.perf_counter()
        if not turn.generated:
            turn.first_token_at = now
        turn.last_token_at = now
        turn.generated.append(token)
        turn.session.tokens.append(token)
        if turn.on_token is not None:
            turn.on_token(token)
        if turn.sampling.stops_at(token):
            turn.finish_reason = "stop"
        elif len(turn.generated) >= turn.sampling.max_new_tokens or len(turn.session.tokens) >= self.max_seq_len:
            turn.finish_reason = "length"
        if turn.finish_reason is None or self.reuse:
            # the sampled token goes into the cache next step; after the last one that step only closes the turn,
            # so the next turn finds its whole history cached
            turn.pending, turn.closing = [token], turn.finish_reason is not None

    def cancel(self, turn: Turn) -> None:
        """Stop generating (Ctrl-C): what was generated stays in the history."""
        if turn.done:
            return
        if turn in self.queue:
            self.queue.remove(turn)
            self.finish(turn, "cancelled", count=False)
            return
        turn.finish_reason = "cancelled"
        turn.session.cached = min(turn.session.cached, turn.pos)
        self.finish(turn, "cancelled")

    def finish(self, turn: Turn, reason: str | None = None, count: bool = True) -> None:
        if turn in self.active:
            self.active.remove(turn)
        turn.finish_reason = reason or turn.finish_reason
        turn.done, turn.session.busy = True, False
        s = turn.stats
        s.generated_tokens = len(turn.generated)
        s.ttft_s = turn.first_token_at - turn.submitted if turn.generated else 0.0
        span = turn.last_token_at - turn.first_token_at
        s.decode_tokens_per_s = (len(turn.generated) - 1) / span if span > 0 else 0.0
        if count:
            turn.session.totals.add(s)
            self.totals.add(s)

    def cache_usage(self) -> tuple[int, int]:
        """(tokens the cache holds over all slots, slots holding a conversation)."""
        held = [s for s in self.slot_owner if s is not None]
        return sum(s.cached for s in held), len(held)

    def generator(self, session: Session) -> torch.Generator:
        """Per-session random stream, so a sampled conversation does not depend on what it was batched with."""
        if session.id not in self.generators:
            self.generators[session.id] = torch.Generator().manual_seed(session.seed)
        return self.generators[session.id]

    def close_session(self, session: Session) -> None:
        """Forget a session and free its slot."""
        if session.slot is not None and self.slot_owner[session.slot] is session:
            self.slot_owner[session.slot] = None
        session.release_cache()
        self.generators.pop(session.id, None)
