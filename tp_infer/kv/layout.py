"""What a model keeps in the KV cache per token, as the model declares it (tp_infer.model.attention.cache_layout):
named quantities of fixed shape in every layer, each kept for every token or for every group of consecutive tokens.
The pool allocates from it, the tiers and the disk files follow it, and sizing counts its bytes; nothing in kv/ knows
the model's classes."""

import math
from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # one fp32 scale per cached row (per row of the last dimension) in FP8 mode


@dataclass(frozen=True)
class CacheQuantity:
    """One cached quantity: `shape` values per token per layer, e.g. (512,) for a latent or (heads, 192) for keys; or,
    with tokens_per_entry g > 1, one entry of `shape` per g consecutive positions (a compressed attention's: a block's
    entry i covers its positions i*g .. i*g + g - 1, so the block size must be a multiple of g)."""

    name: str
    shape: tuple[int, ...]
    tokens_per_entry: int = 1

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
    def per_entry(self) -> list[int]:
        return [q.tokens_per_entry for q in self.quantities]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes on each rank, over all layers (a grouped quantity's entry shared by its
        tokens), rounded up."""
        scales = SCALE_BYTES if self.fp8 else 0
        entries = [(q.values * self.dtype.itemsize + q.rows * scales, q.tokens_per_entry) for q in self.quantities]
        return math.ceil(self.layers * sum(size / tokens for size, tokens in entries))

    def check_block_size(self, block_size: int) -> None:
        """Refuse a block size that does not hold whole groups of every grouped quantity."""
        for q in self.quantities:
            if block_size % q.tokens_per_entry:
                raise ValueError(
                    f"block size {block_size}: the cache's {q.name} keeps one entry per {q.tokens_per_entry} tokens; "
                    "the block size must be a multiple of it"
                )
