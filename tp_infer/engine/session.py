"""A conversation as the model saw it: its exact token ids (generated ids included, never re-tokenised), where
each turn starts, and how much of it the cache slot holds. Plus the statistics the engine keeps."""

from dataclasses import dataclass, field


@dataclass
class TurnStats:
    """One turn. reused_tokens came from the cache; computed_tokens were prefilled; the two sum to prompt_tokens.
    prev_pos is where the prefill started, end_pos where the prompt ends."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    dropped_tokens: int = 0  # history removed by the overflow policy
    prev_pos: int = 0
    end_pos: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class Totals:
    turns: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0

    def add(self, turn: TurnStats) -> None:
        self.turns += 1
        self.prompt_tokens += turn.prompt_tokens
        self.reused_tokens += turn.reused_tokens
        self.computed_tokens += turn.computed_tokens
        self.generated_tokens += turn.generated_tokens


@dataclass
class Session:
    """tokens[:cached] sit in cache slot `slot` (slot None: no cache). turn_starts[i] is where turn i begins;
    the tokens before the first turn are the system prompt, which the overflow policy never drops."""

    id: str
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0
    last_used: int = 0
    busy: bool = False
    totals: Totals = field(default_factory=Totals)

    def release_cache(self) -> None:
        self.slot, self.cached = None, 0
