"""Tensor-parallel building blocks in DeepSeek's reference layout: each rank holds a slice, collectives join them.
Every hardware path (products that may read FP8, norms, attention over the pool, the experts) goes through the
model's backend (tp_infer.backends), which the runner chooses once; these modules only hold weights and say the
math."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.backends import Backend, reference
from tp_infer.distributed import all_reduce
from tp_infer.model import fp8


@dataclass(frozen=True)
class TensorParallel:
    """Which slice of every parallel layer this process holds."""

    rank: int = 0
    world_size: int = 1

    def split(self, size: int) -> int:
        assert size % self.world_size == 0, f"{size} does not split over {self.world_size} ranks"
        return size // self.world_size


class Layer(nn.Module):
    """A module whose hardware paths go through `backend`: the torch reference unless Transformer.use_backend (or a
    test) gives another."""

    backend: Backend = reference()


class Linear(Layer):
    """y = x W^T. W is either in the compute dtype or float8_e4m3fn with a `scale` per 128x128 block."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp8_weights: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight_dtype = torch.float8_e4m3fn if fp8_weights else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        if fp8_weights:
            shape = fp8.scale_shape(out_features, in_features)
            self.scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.scale)


class ColumnParallelLinear(Linear):
    """Output features split across ranks; each rank returns its slice, no communication."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, dtype: torch.dtype, fp8_weights=False):
        super().__init__(in_features, tp.split(out_features), dtype, fp8_weights)


class RowParallelLinear(Linear):
    """Input features split across ranks; partial outputs are summed by an all-reduce (unless the caller fuses it)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TensorParallel,
        dtype: torch.dtype,
        fp8_weights=False,
        reduce: bool = True,
    ):
        super().__init__(tp.split(in_features), out_features, dtype, fp8_weights)
        self.world_size = tp.world_size
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return all_reduce(y, self.world_size) if self.reduce else y


class ParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks: ids outside this rank's range embed to zero, then an all-reduce."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.part = tp.split(vocab_size)
        self.start = tp.rank * self.part
        self.world_size = tp.world_size
        self.weight = nn.Parameter(torch.empty(self.part, dim, dtype=dtype), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(y, self.world_size)


class RMSNorm(Layer):
    """Root-mean-square norm computed in fp32, as both the reference and transformers do."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """Layer norm with a bias, parameters and arithmetic in fp32 (V3.2's indexer keys), the result in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(x.dtype)
