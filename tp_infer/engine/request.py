"""A turn: one reply being generated for a session, and where it stands in the pool."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session, TurnStats
from tp_infer.kv.manager import BlockTable


@dataclass(eq=False)
class Turn:
    """tokens is the prompt followed by what has been generated (the session's own list while the turn runs); the
    pool holds tokens[:num_cached] for it, through `table`. The next step feeds tokens[num_cached:]."""

    session: Session
    prompt: list[int]
    turn_starts: list[int]
    sampling: SamplingParams
    on_token: Callable[[int], None] | None = None
    stats: TurnStats = field(default_factory=TurnStats)
    tokens: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    num_cached: int = 0
    table: BlockTable | None = None
    admissions: int = 0
    looked_up: int = -1  # the length of tokens when the disk tier was last searched for them
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # with finish_reason "error": what failed in this turn, in one line
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def extend_len(self) -> int:
        """Tokens the pool does not hold yet."""
        return len(self.tokens) - self.num_cached

    @property
    def prefilling(self) -> bool:
        return not self.generated or self.extend_len > 1

    @property
    def cache_salt(self) -> str | None:
        """The namespace of the cache this turn reuses and fills: its session's (Session.cache_salt)."""
        return self.session.cache_salt

    @property
    def closing(self) -> bool:
        """The reply has ended and its last token is being written to the cache; nothing more is sampled."""
        return self.finish_reason is not None
