"""Sampling parameters and the choice of the next token from one row of logits."""

import math
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


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. Generation ends at a stop token (eos unless ignore_eos, or any of stop_token_ids)
    or after max_new_tokens. Every value the sampler can take is accepted: a temperature so small that the logits
    over it overflow samples as greedy, a nucleus too small to hold any token keeps the likeliest one."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check("temperature", self.temperature, "a number >= 0", lambda t: t >= 0)
        _check("top_p", self.top_p, "a number in (0, 1]", lambda p: 0 < p <= 1)
        _check("top_k", self.top_k, "an integer >= 0", lambda k: k >= 0, integer=True)
        _check("max_new_tokens", self.max_new_tokens, "an integer >= 1", lambda n: n >= 1, integer=True)

    def stops_at(self, token: int) -> bool:
        return token in self.stop_token_ids or (not self.ignore_eos and token in self.eos_token_ids)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick a token from logits [V]: argmax when greedy, else from the temperature/top-k/top-p distribution.
    Computed in float64 from the logits less their maximum, so the likeliest token always has weight 1: any
    temperature > 0 and top_p > 0 give a valid distribution (a NaN logit counts as -inf)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.detach().double()
    logits = logits.masked_fill(logits.isnan(), float("-inf"))
    top = logits.max()
    if not torch.isfinite(top):  # nothing finite to weigh (all -inf, or +inf logits): take the first maximum
        return int(logits.argmax())
    scaled = (logits - top) / params.temperature  # <= 0, exactly 0 at the maximum; -inf where it underflows
    if params.top_k and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    weights = scaled.exp()
    if params.top_p < 1:
        probs = weights / weights.sum()
        sorted_probs, order = probs.sort(descending=True)
        # drop a token once the tokens before it already reach top_p; the most likely token always stays
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False
        weights = weights.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(weights.cpu(), 1, generator=generator))
