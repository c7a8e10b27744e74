"""Sampling parameters and the choice of the next token from one row of logits."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_seed(seed) -> int:
    """A sampling seed as the generator takes it; raises ValueError naming `seed` for anything else."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed!r}")
    return seed


def _check(name: str, value, rule: str, holds, integer: bool = False) -> None:
    """Raise ValueError "{name} must be {rule}, got {value}" unless value is a finite number (an integer if
    `integer`; never a bool) for which holds(value) is true."""
    kind = int if integer else Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if not integer and not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not holds(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _finite(value: Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


# the SamplingParams fields a request (a server request, a batch line) may set under the same name, max_new_tokens
# aside (the server calls it max_tokens)
REQUEST_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


@dataclass(frozen=True)
class SamplingParams:
    """How a reply is sampled and shown, with vLLM's meanings. temperature 0 is greedy. Generation ends at a stop
    token (eos unless ignore_eos, or any of stop_token_ids) or after max_new_tokens; before min_tokens tokens the
    stop tokens are held back (never sampled). The sampler, in order: repetition_penalty on the logits of every token
    already in the conversation (prompt or reply; a positive logit divided by it, a negative one multiplied), the
    temperature, then top_k (the k likeliest), min_p (tokens at least min_p times as likely as the likeliest) and top_p
    (the smallest nucleus reaching p). skip_special_tokens and include_stop_str_in_output say what the reply's text
    shows: special tokens' text, and the stop token's (or the stop string matched). Every value the sampler can take
    is accepted: a temperature so small that the logits over it overflow samples as greedy, a nucleus too small to
    hold any token keeps the likeliest one; top_k -1 means no cut, as 0 (vLLM's spelling)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): no top-k cut
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _check("temperature", self.temperature, "a number >= 0", lambda t: t >= 0)
        _check("top_p", self.top_p, "a number in (0, 1]", lambda p: 0 < p <= 1)
        _check("top_k", self.top_k, "an integer >= 0", lambda k: k >= -1, integer=True)  # -1: vLLM's "no cut"
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check("max_new_tokens", self.max_new_tokens, "an integer >= 1", lambda n: n >= 1, integer=True)
        rule = f"an integer in [0, max_new_tokens {self.max_new_tokens}]"
        _check("min_tokens", self.min_tokens, rule, lambda n: 0 <= n <= self.max_new_tokens, integer=True)
        _check("min_p", self.min_p, "a number in [0, 1]", lambda p: 0 <= p <= 1)
        _check("repetition_penalty", self.repetition_penalty, "a number > 0", lambda r: r > 0)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("eos_token_ids", "stop_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
            for t in ids:
                _check(name, t, "a list of integer token ids >= 0", lambda i: i >= 0, integer=True)
            object.__setattr__(self, name, tuple(ids))

    def stops_at(self, token: int, position: int | None = None) -> bool:
        """Whether `token`, the reply's token number `position` (from 0; None: past min_tokens), ends the reply."""
        if position is not None and position < self.min_tokens:
            return False
        return token in self.stop_token_ids or (not self.ignore_eos and token in self.eos_token_ids)

    def held_back(self, generated: int) -> tuple[int, ...]:
        """The ids that may not be sampled after `generated` tokens of the reply: the stop tokens, until min_tokens."""
        if generated >= self.min_tokens:
            return ()
        return self.stop_token_ids + (() if self.ignore_eos else self.eos_token_ids)

    def shows(self, token: int, position: int) -> bool:
        """Whether the reply's token number `position` appears in its text: all but the stop token that ended it,
        unless include_stop_str_in_output."""
        return self.include_stop_str_in_output or not self.stops_at(token, position)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    tokens: Sequence[int] = (),
    generated: int = 0,
) -> int:
    """Pick a token from logits [V]: argmax when greedy, else from the temperature/top-k/min-p/top-p distribution.
    tokens: the conversation so far (prompt and reply), which repetition_penalty reads; generated: the reply's length
    so far, which min_tokens reads. Computed in float64 from the logits less their maximum, so the likeliest token
    always has weight 1: any temperature > 0 and top_p > 0 give a valid distribution (a NaN logit counts as -inf)."""
    banned = params.held_back(generated)
    penalty = params.repetition_penalty != 1 and len(tokens) > 0
    if params.temperature == 0 and not banned and not penalty:
        return int(logits.argmax())
    logits = logits.detach().double()
    logits = logits.masked_fill(logits.isnan(), float("-inf"))
    if penalty:
        logits = penalize(logits, tokens, params.repetition_penalty)
    if banned:
        ids = torch.tensor(banned, dtype=torch.long)
        logits[ids[ids < logits.numel()]] = float("-inf")
    if params.temperature == 0:
        return int(logits.argmax())
    top = logits.max()
    if not torch.isfinite(top):  # nothing finite to weigh (all -inf, or +inf logits): take the first maximum
        return int(logits.argmax())
    scaled = (logits - top) / params.temperature  # <= 0, exactly 0 at the maximum; -inf where it underflows
    if params.top_k and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    weights = scaled.exp()
    if params.min_p > 0:  # the likeliest token weighs 1: min_p times its probability is min_p in weight
        weights = weights.masked_fill(weights < params.min_p, 0.0)
    if params.top_p < 1:
        probs = weights / weights.sum()
        sorted_probs, order = probs.sort(descending=True)
        # drop a token once the tokens before it already reach top_p; the most likely token always stays
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False
        weights = weights.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(weights.cpu(), 1, generator=generator))


def penalize(logits: torch.Tensor, tokens: Sequence[int], penalty: float) -> torch.Tensor:
    """vLLM's repetition penalty on float64 logits: each id in `tokens` has a positive logit divided by `penalty`, a
    negative one multiplied by it (ids outside the logits are ignored)."""
    seen = torch.as_tensor(list(tokens), dtype=torch.long).unique()
    seen = seen[(seen >= 0) & (seen < logits.numel())]
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits
