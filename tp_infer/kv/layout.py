"""What a model keeps in the KV cache per token, as the model declares it (tp_infer.model.attention.cache_layout):
named quantities of fixed shape in every layer. The pool allocates from it, the tiers and the disk files follow it,
and sizing counts its bytes; nothing in kv/ knows the model's classes."""

import math
from dataclasses import dataclass

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
    """Every layer of the model keeps `quantities` for each token."""

    layers: int
    quantities: tuple[CacheQuantity, ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [q.shape for q in self.quantities]

    def bytes_per_token(self, itemsize: int, fp8: bool) -> int:
        """Cache bytes one token takes over all layers, at `itemsize` bytes a value (and its scales when FP8)."""
        per_layer = sum(q.values * itemsize + (q.rows * SCALE_BYTES if fp8 else 0) for q in self.quantities)
        return per_layer * self.layers
