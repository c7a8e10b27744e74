"""What a model keeps in the KV cache per token, as the model declares it (tp_infer.model.attention.cache_layout):
named quantities of fixed shape in every layer. The pool allocates from it, the tiers and the disk files follow it,
and sizing counts its bytes; nothing in kv/ knows the model's classes."""

import math
from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # one fp32 scale per cached row (per row of the last dimension) in FP8 mode


@dataclass(frozen=True)
class CacheQuantity:
    """One cached quantity: `shape` values per token per layer, e.g. (512,) for a latent or (heads, 192) for keys."""

    name: str
    shape: tuple[int, ...]

    @property
    def values(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows of the last dimension: the FP8 scales per token."""
        return self.values // self.shape[-1]


@dataclass(frozen=True)
class CacheLayout:
    """Every layer of the model keeps `quantities` for each token, stored as `dtype` (float8_e4m3fn: with one fp32
    scale per row of each quantity's last dimension). `replicated`: every rank keeps the same entries (so one copy
    of a block serves all ranks on disk)."""

    layers: int
    quantities: tuple[CacheQuantity, ...]
    dtype: torch.dtype
    replicated: bool

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [q.shape for q in self.quantities]

    @property
    def fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes on each rank, over all layers."""
        scales = SCALE_BYTES if self.fp8 else 0
        per_layer = sum(q.values * self.dtype.itemsize + q.rows * scales for q in self.quantities)
        return per_layer * self.layers
