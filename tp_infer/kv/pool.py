"""The KV pool on every rank: per layer, the quantities attention caches, in fixed-size blocks that any conversation
may hold. Allocated once by the runner; the model reads and writes it through the step's slot mapping and block
tables, and rank 0's block manager decides who holds which block.

Each quantity is one tensor [num_blocks, block_size, *shape], kept in the compute dtype or in float8_e4m3fn with one
fp32 scale per token (per row of the last dimension: per head in naive mode), [num_blocks, block_size, *shape[:-1]].
"""

import torch

from tp_infer.kv.layout import CacheLayout

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}  # "auto": compute dtype


class CacheTensor:
    """One quantity of one layer: [num_blocks, block_size / tokens_per_entry, *shape] (a row per token, or per group
    of tokens_per_entry consecutive tokens of a block)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device,
        pin=False,
        tokens_per_entry: int = 1,
    ):
        self.fp8 = dtype == torch.float8_e4m3fn
        self.block_size, self.tokens_per_entry = block_size, tokens_per_entry
        rows = block_size // tokens_per_entry
        self.data = torch.zeros(num_blocks, rows, *shape, dtype=dtype, device=device, pin_memory=pin)
        scale_shape = (num_blocks, rows, *shape[:-1])
        self.scale = torch.zeros(scale_shape, device=device, pin_memory=pin) if self.fp8 else None

    def entry_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows of this tensor's flat view [num_blocks * rows, ...] holding the entries of the tokens at flat
        slots (block * block_size + offset): the slots themselves for a quantity kept per token."""
        if self.tokens_per_entry == 1:
            return slots
        rows = self.block_size // self.tokens_per_entry
        return slots // self.block_size * rows + slots % self.block_size // self.tokens_per_entry

    @property
    def parts(self) -> list[torch.Tensor]:
        """The tensors that hold it: the values, and the FP8 scales."""
        return [self.data, self.scale] if self.fp8 else [self.data]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.fp8 else 0)

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store values [N, *shape] at rows [N] of the flat view (block * block_size + offset for a quantity kept per
        token; entry_slots gives a grouped one's), quantising them if FP8."""
        flat = self.data.view(-1, *self.data.shape[2:])
        if not self.fp8:
            flat[slots] = values.to(flat.dtype)
            return
        values = values.float()
        scale = values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        flat[slots] = (values / scale).to(torch.float8_e4m3fn)
        self.scale.view(-1, *self.scale.shape[2:])[slots] = scale.squeeze(-1)

    def read(self, block_table: torch.Tensor, dtype: torch.dtype, first_block: int | None = None) -> torch.Tensor:
        """The blocks of each row of block_table [R, nb], as [R, nb * rows, *shape] in `dtype`. first_block
        says the one row's blocks are consecutive from there: a view of the pool is read then, nothing copied."""
        data = blocks_of(self.data, block_table, first_block)
        if not self.fp8:
            return data.to(dtype)
        # one copy into `dtype`, then the scales multiplied in place (each product rounded once): no fp32 copy
        return data.to(dtype).mul_(blocks_of(self.scale, block_table, first_block).unsqueeze(-1))

    def copy(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        self.data[destinations] = self.data[sources]
        if self.fp8:
            self.scale[destinations] = self.scale[sources]


def blocks_of(tensor: torch.Tensor, block_table: torch.Tensor, first_block: int | None) -> torch.Tensor:
    """tensor [num_blocks, block_size, ...] at the blocks of block_table [R, nb], as [R, nb * block_size, ...]: a
    view when they are the consecutive blocks from first_block, else one index_select (several times faster on the
    CPU than advanced indexing with a 2-D index)."""
    rows, nb = block_table.shape
    if first_block is not None:
        return tensor[first_block : first_block + nb].flatten(0, 1).unsqueeze(0)
    return tensor.index_select(0, block_table.flatten()).view(rows, nb * tensor.shape[1], *tensor.shape[2:])


class LayerCache:
    """One layer's share of the pool: one CacheTensor per quantity the layer caches, in the cache layout's order
    (absorb: latent and rope key; naive: this rank's heads' keys and values; then V3.2's indexer keys)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        shapes: list[tuple[int, ...]],
        dtype: torch.dtype,
        device,
        pin=False,
        per_entry: list[int] | None = None,
    ):
        """per_entry[i]: the tokens each entry of quantity i covers (1 for all by default)."""
        per_entry = per_entry or [1] * len(shapes)
        self.tensors = [
            CacheTensor(num_blocks, block_size, shape, dtype, device, pin, tokens)
            for shape, tokens in zip(shapes, per_entry, strict=True)
        ]

    @property
    def data(self) -> list[torch.Tensor]:
        """Each quantity's values [num_blocks, block_size, *shape], for kernels that use the pool in place."""
        return [tensor.data for tensor in self.tensors]

    def write(self, slots: torch.Tensor, *values: torch.Tensor) -> None:
        """Store one step's new entries, values[i] [N, *shapes[i]], at flat slots [N]."""
        for tensor, value in zip(self.tensors, values, strict=True):
            tensor.write(slots, value)

    def read(
        self, block_table: torch.Tensor, dtype: torch.dtype, first_block: int | None = None, count: int | None = None
    ) -> list[torch.Tensor]:
        """The first `count` quantities (all by default) over the rows' blocks, [R, nb * block_size, *shapes[i]]
        each (see CacheTensor.read)."""
        return [tensor.read(block_table, dtype, first_block) for tensor in self.tensors[:count]]


class KVPool:
    """num_blocks blocks of block_size tokens for every layer, on this rank's device (or in host memory for the host
    tier: pinned when the device is a GPU, so that copies to the GPU can run asynchronously)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        shapes: list[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        pin: bool = False,
        spare: int = 0,
        per_entry: list[int] | None = None,
    ):
        """`spare` blocks more are allocated past num_blocks, which no turn is given: blocks num_blocks, ... are
        scratch (a padded row of a compiled decode step writes there). per_entry: as LayerCache's."""
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self.spare_block = num_blocks if spare else None
        total = num_blocks + spare
        self.layers = [LayerCache(total, block_size, shapes, dtype, device, pin, per_entry) for _ in range(num_layers)]
        self.named = {}  # every tensor by name: "{layer}.{quantity}", and "{layer}.{quantity}.scale" (FP8)
        for i, layer in enumerate(self.layers):
            for j, tensor in enumerate(layer.tensors):
                for part, suffix in zip(tensor.parts, ("", ".scale"), strict=False):
                    self.named[f"{i}.{j}{suffix}"] = part

    def block(self, block: int) -> dict[str, torch.Tensor]:
        """Views of one block in every tensor, [block_size, ...] each, by name."""
        return {name: part[block] for name, part in self.named.items()}

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The shape and dtype of one block in each tensor, by name."""
        return {name: (tuple(part.shape[1:]), part.dtype) for name, part in self.named.items()}

    def copy_to(self, other: "KVPool", sources: list[int], destinations: list[int]) -> None:
        """Copy blocks into another pool of the same layout (between the pool and the host tier), destinations all
        different: per tensor one gather, one copy across and one scatter on the current stream, not one copy a block
        (a 2,000-token restore is some 2,000 small copies at the bench model's shapes)."""
        here = torch.tensor(sources, device=self.layers[0].tensors[0].data.device)
        there = torch.tensor(destinations, device=other.layers[0].tensors[0].data.device)
        for name, part in self.named.items():
            target = other.named[name]
            if part.is_pinned():  # the host tier's: gathered into pinned memory too, so its copy to the GPU is async
                staged = torch.empty(len(sources), *part.shape[1:], dtype=part.dtype, pin_memory=True)
                gathered = torch.index_select(part, 0, here, out=staged)
            else:
                gathered = part.index_select(0, here)
            # a copy to the host waits for the GPU, as the scatter there reads it next (index_put: index_copy_ has no
            # FP8 on the CPU)
            target[there] = gathered.to(target.device, non_blocking=target.is_cuda)

    @classmethod
    def of(
        cls, layout: CacheLayout, num_blocks: int, block_size: int, device: torch.device, pin=False, spare: int = 0
    ) -> "KVPool":
        """The pool a model's cache layout asks for."""
        layout.check_block_size(block_size)
        shapes, dtype = layout.shapes, layout.dtype
        return cls(layout.layers, num_blocks, block_size, shapes, dtype, device, pin, spare, layout.per_entry)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer.tensors)

    def copy(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Copy whole blocks (of every layer): a turn's own block starts as a copy of a block it matched in part."""
        for layer in self.layers:
            for tensor in layer.tensors:
                tensor.copy(sources, destinations)
