"""A conversation as the model saw it: its exact token ids (generated ids included, never re-tokenised) and where
each turn starts. It holds no cache: its next turn finds its history in the prefix tree like any other prompt.
Plus the statistics the engine keeps."""

from dataclasses import dataclass, field


@dataclass
class TurnStats:
    """One turn. reused_tokens came from the cache (copied_tokens of them from a block that matched in part;
    host_tokens restored from host memory and disk_tokens from disk, the rest found in the pool); computed_tokens
    were prefilled; reused and computed sum to prompt_tokens. prev_pos is where the prefill started, end_pos
    where the prompt ends. A preempted turn recomputes recomputed_tokens when it resumes."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    copied_tokens: int = 0
    host_tokens: int = 0
    disk_tokens: int = 0
    dropped_tokens: int = 0  # history removed by the overflow policy
    prev_pos: int = 0
    end_pos: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class Totals:
    turns: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    host_tokens: int = 0
    disk_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0

    def add(self, turn: TurnStats) -> None:
        self.turns += 1
        self.prompt_tokens += turn.prompt_tokens
        self.reused_tokens += turn.reused_tokens
        self.host_tokens += turn.host_tokens
        self.disk_tokens += turn.disk_tokens
        self.computed_tokens += turn.computed_tokens
        self.generated_tokens += turn.generated_tokens
        self.preemptions += turn.preemptions
        self.recomputed_tokens += turn.recomputed_tokens


@dataclass
class Session:
    """turn_starts[i] is where turn i begins; the tokens before the first turn are the system prompt, which the
    overflow policy never drops. cache_salt: the tenant's namespace in the cache (vLLM's name): its turns reuse only
    what turns of the same salt cached, and theirs never see its prefixes; None is the shared namespace. It changes
    nothing the model computes."""

    id: str
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    cache_salt: str | None = None
    busy: bool = False
    totals: Totals = field(default_factory=Totals)
