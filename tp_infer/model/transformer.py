"""The DeepSeek-V2/V3/V3.2 transformer, tensor-parallel: one forward takes any rows of new tokens, each at its own
position over its own cached blocks of the pool."""

import torch
from torch import nn

from tp_infer.backends import Backend, pick
from tp_infer.config import ModelArgs
from tp_infer.distributed import all_gather_last_dim, gather_last_dim
from tp_infer.kv.pool import CACHE_DTYPES, LayerCache
from tp_infer.model.attention import MLA
from tp_infer.model.batch import ForwardBatch
from tp_infer.model.layers import ColumnParallelLinear, Layer, ParallelEmbedding, RMSNorm, TensorParallel
from tp_infer.model.moe import MLP, MoE
from tp_infer.model.rope import rope_rotations

DTYPES = {name: CACHE_DTYPES[name] for name in ("bf16", "fp32")}  # the compute dtypes, by their option names


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = MLA(args, tp, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim, tp, dtype, args.fp8_weights)
        else:
            self.ffn = MoE(args, tp, dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, rotations: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), batch, cache, rotations)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Embedding, blocks, final norm and the vocab-parallel head; state dict names follow DeepSeek's reference. Its
    hardware paths go through `backend`: by default the fastest for the device it is built on (torch.device(...)
    as a context) and its dtype (tp_infer.backends.pick)."""

    def __init__(self, args: ModelArgs, tp: TensorParallel | None = None, backend: Backend | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        args.check_world_size(tp.world_size)
        self.args, self.tp = args, tp
        dtype = DTYPES[args.dtype]
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, tp, dtype)
        self.layers = nn.ModuleList(Block(i, args, tp, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, tp, dtype)
        self.register_buffer("rope", rope_rotations(args), persistent=False)
        self.use_backend(backend or pick("auto", torch.get_default_device().type, args.dtype))

    def use_backend(self, backend: Backend) -> None:
        """Route every layer's hardware paths through `backend`."""
        self.backend = backend
        for module in self.modules():
            if isinstance(module, Layer):
                module.backend = backend

    @torch.no_grad()  # not inference_mode: a compiled step writes the pool, which inference tensors would forbid
    def forward(
        self,
        tokens: torch.Tensor,
        batch: ForwardBatch,
        cache: list[LayerCache],
        all_logits: bool = False,
        logits_on_all_ranks: bool = True,
    ) -> torch.Tensor | None:
        """Run the step's new tokens [N] (batch says where each sits and what it attends over) and return fp32 logits
        of each row's last token [B, V], or of every token [N, V] with all_logits; with logits_on_all_ranks=False
        only rank 0 gets them."""
        rotations = self.rope[batch.positions]
        h = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, batch, layer_cache, rotations)
        if not all_logits:
            h = h[batch.last]
        local = self.head(self.norm(h)).float()
        if logits_on_all_ranks:
            return all_gather_last_dim(local, self.tp.world_size)
        return gather_last_dim(local, self.tp.rank, self.tp.world_size)
