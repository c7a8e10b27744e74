"""Multi-head latent attention (MLA) in DeepSeek's two forms, side by side: naive (each head's keys and values
cached) and absorb (the shared latent and rope key cached, wkv_b folded into the query and the output), and V3.2's
lightning indexer, which narrows what each query attends to (DeepSeek Sparse Attention). The model says the math;
the backend stores each step's new entries in the pool and attends over it (tp_infer.backends)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.kv.layout import CacheLayout, CacheQuantity
from tp_infer.kv.pool import CACHE_DTYPES, LayerCache
from tp_infer.model.batch import ForwardBatch
from tp_infer.model.layers import (
    ColumnParallelLinear,
    Layer,
    LayerNorm,
    Linear,
    RMSNorm,
    RowParallelLinear,
    TensorParallel,
)
from tp_infer.model.rope import apply_rope_halves

# index scores computed at once (query rows x indexer heads x positions): bounds the fp32 scratch of a long prefill
INDEX_SCORE_ELEMENTS = 1 << 24


def cache_layout(args: ModelArgs, world_size: int) -> CacheLayout:
    """What each token leaves in each layer's cache on each rank, in the cache dtype (`kv_cache_dtype`, or the compute
    dtype for auto): absorb, the latent and the rope key, the same on every rank; naive, the local heads' keys and
    values; with V3.2's sparse attention, then the indexer's key (the same on every rank). Attention's own
    quantities come first (MLA.attended of them). The one declaration the pool, the tiers and sizing follow."""
    dtype = CACHE_DTYPES[args.dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype]
    absorb = args.attn_impl == "absorb"
    if absorb:
        quantities = (
            CacheQuantity(name="latent", shape=(args.kv_lora_rank,)),
            CacheQuantity(name="rope_key", shape=(args.qk_rope_head_dim,)),
        )
    else:
        heads = args.n_heads // world_size
        quantities = (
            CacheQuantity(name="key", shape=(heads, args.qk_head_dim)),
            CacheQuantity(name="value", shape=(heads, args.v_head_dim)),
        )
    if args.sparse:
        quantities += (CacheQuantity(name="index_key", shape=(args.index_head_dim,)),)
    return CacheLayout(layers=args.n_layers, quantities=quantities, dtype=dtype, replicated=absorb)


@dataclass
class NewEntries:
    """A step's new tokens as attention needs them: the rotated query q [N, H, nope + rope], and what the cache
    keeps of each (absorb: latent [N, C] and rope key [N, P]; naive: keys [N, H, nope + rope] and values [N, H, V])."""

    q: torch.Tensor
    entries: tuple[torch.Tensor, ...]


@dataclass
class IndexQueries:
    """What V3.2's lightning indexer brings for a step's new tokens: queries q [N, Hi, Di] (rope part rotated), their
    per-head weights [N, Hi] in fp32 (1/sqrt(Hi) and the 1/sqrt(Di) score scale folded in), and the key each token
    leaves in the cache, key [N, Di] (normalised, rope part rotated)."""

    q: torch.Tensor
    weights: torch.Tensor
    key: torch.Tensor


class Indexer(nn.Module):
    """DeepSeek Sparse Attention's lightning indexer, the same on every rank (as in DeepSeek's reference): a query per
    head from the MLA query latent, one key per token, and per-head weights. A query's score for a position it may see
    is sum_h w[h] relu(q_h . k); attention covers the `topk` highest only (all it sees while that is fewer). Rope
    rotates the first rope_dim dims of query and key in the half-split layout. Scores are computed in fp32 from the
    keys as cached (transformers' form: DeepSeek's Hadamard rotation preserves the products, its FP8 scoring is a
    precision choice)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.topk = args.index_topk
        self.wq_b = Linear(args.q_lora_rank, self.heads * self.head_dim, dtype, args.fp8_weights)
        self.wk = Linear(args.dim, self.head_dim, dtype, args.fp8_weights)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = Linear(args.dim, self.heads, torch.float32)  # fp32, as transformers keeps it
        self.weight_scale = self.heads**-0.5 * self.head_dim**-0.5

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, rotations: torch.Tensor) -> IndexQueries:
        """x [N, dim] and the MLA query latent q_latent [N, q_lora_rank] (q_norm(wq_a(x))) of the step's tokens."""
        q = self.rotate(self.wq_b(q_latent).view(x.shape[0], self.heads, self.head_dim), rotations)
        key = self.rotate(self.k_norm(self.wk(x)), rotations)
        return IndexQueries(q=q, weights=self.weights_proj(x.float()) * self.weight_scale, key=key)

    def rotate(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        rope, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope_halves(rope, rotations), rest], dim=-1)

    def narrows(self, positions: int) -> bool:
        """Whether a query over `positions` keys can see more than topk of them (else attention stays dense)."""
        return positions > self.topk

    def scores(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Index scores [R, T, S] in fp32 of queries q [R, T, Hi, Di] with weights [R, T, Hi] over keys [R, S, Di]."""
        rows, width, heads, _ = q.shape
        products = torch.bmm(q.float().flatten(1, 2), keys.float().mT).relu_()  # [R, T*Hi, S]
        per_query = products.view(rows * width, heads, -1)
        return torch.bmm(weights.float().reshape(rows * width, 1, heads), per_query).view(rows, width, -1)

    def select(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """visible [R, T, S] narrowed to each query's topk best-scoring visible positions (queries q [R, T, Hi, Di],
        weights [R, T, Hi], cached keys [R, S, Di]). Equal scores go to the earlier position, so a query selects the
        same positions whatever else shares its step. Computed a slice of queries at a time."""
        rows, width, _, _ = q.shape
        chosen = torch.zeros_like(visible)
        step = max(1, INDEX_SCORE_ELEMENTS // (rows * self.heads * keys.shape[1]))
        for start in range(0, width, step):
            end = min(start + step, width)
            seen = visible[:, start:end]
            scores = self.scores(q[:, start:end], weights[:, start:end], keys).masked_fill_(~seen, float("-inf"))
            best = scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.topk]
            chosen[:, start:end].scatter_(-1, best, True)
        return chosen & visible


class MLA(Layer):
    """Latent attention on this rank's heads. naive caches per-head k/v; absorb caches the shared latent and
    rope key and folds wkv_b into the query and the output."""

    attended = 2  # the cache layout's quantities attention reads: the first two (an indexer key follows)

    def __init__(self, args: ModelArgs, tp: TensorParallel, dtype: torch.dtype):
        super().__init__()
        self.local_heads = tp.split(args.n_heads)
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.softmax_scale = args.softmax_scale
        self.attn_impl = args.attn_impl
        q_out = args.n_heads * args.qk_head_dim
        fp8 = args.fp8_weights
        if args.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(args.dim, q_out, tp, dtype, fp8)
        else:
            self.wq_a = Linear(args.dim, args.q_lora_rank, dtype, fp8)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, dtype)
            self.wq_b = ColumnParallelLinear(args.q_lora_rank, q_out, tp, dtype, fp8)
        self.wkv_a = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, dtype, fp8)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.norm_eps, dtype)
        self.wkv_b = ColumnParallelLinear(
            args.kv_lora_rank, args.n_heads * (self.nope_dim + self.v_dim), tp, dtype, fp8
        )
        self.wo = RowParallelLinear(args.n_heads * self.v_dim, args.dim, tp, dtype, fp8)
        self.indexer = Indexer(args, dtype) if args.sparse else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, rotations: torch.Tensor) -> torch.Tensor:
        """x [N, dim]: the step's new tokens; rotations [N, rope_dim / 2, 2] (cos, sin) at their positions. The backend
        stores their cache entries (and indexer keys) and attends: out [N, H, V]."""
        n = x.shape[0]
        q_latent = None if hasattr(self, "wq") else self.q_norm(self.wq_a(x))
        q = self.wq(x) if q_latent is None else self.wq_b(q_latent)
        q = q.view(n, self.local_heads, self.nope_dim + self.rope_dim)
        index = None if self.indexer is None else self.indexer(x, q_latent, rotations)
        out = self.backend.attention(self, q, self.wkv_a(x), batch, cache, rotations, index)
        return self.wo(out.flatten(1))

    def narrows(self, positions: int) -> bool:
        """Whether the indexer narrows the attention of queries over `positions` cached positions."""
        return self.indexer is not None and self.indexer.narrows(positions)

    def wkv_b_heads(self, dtype: torch.dtype) -> torch.Tensor:
        """wkv_b per head, [H, nope + v, C] in `dtype`: what takes the latent to keys and values."""
        weight = self.backend.dense_weight(self.wkv_b.weight, self.wkv_b.scale, dtype)
        return weight.view(self.local_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def new_entries(
        self, q: torch.Tensor, kv: torch.Tensor, rotations: torch.Tensor, wkv_b: torch.Tensor
    ) -> NewEntries:
        """The query q [N, H, nope + rope] with its rope part rotated (in place), and the cache entries of kv
        [N, C + P] (wkv_a's output): the latent normalised, the rope key rotated; in naive form taken to each head's
        keys and values by wkv_b [H, nope + v, C]."""
        self.backend.rope_(q[..., self.nope_dim :], rotations)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = self.backend.rope(k_pe, rotations)
        if self.attn_impl == "absorb":
            return NewEntries(q=q, entries=(latent, k_pe))
        k_nope, v = self.expand(latent, wkv_b)
        return NewEntries(q=q, entries=(torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.local_heads, -1)], -1), v))

    def expand(self, latent: torch.Tensor, wkv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head k_nope [..., H, nope] and v [..., H, v] of latents [..., C], in one product with wkv_b
        [H, nope + v, C]."""
        kv = self.backend.linear(latent.flatten(0, -2), wkv_b.flatten(0, 1))
        return kv.view(*latent.shape[:-1], self.local_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)

    def expanding_is_cheaper(self, new_tokens: int, kv_len: int) -> bool:
        """Whether an absorb-mode forward costs fewer FLOPs by expanding the cached latent to per-head keys and
        values once (kv_len x latent x (nope + v)) than by attending in latent space (new x kv_len x 2 latent).
        True for long prefills (over ~170 new tokens on a long history at V3's shapes), never for decode."""
        absorb = new_tokens * (self.kv_lora_rank * (self.nope_dim + self.v_dim + 2 * kv_len) + kv_len * self.rope_dim)
        expand = kv_len * (self.kv_lora_rank + new_tokens) * (self.nope_dim + self.v_dim) + (
            new_tokens * kv_len * self.rope_dim
        )
        return expand < absorb

    def absorbed(
        self, q: torch.Tensor, wkv_b: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """Absorbed attention of rows of queries q [R, T, H, nope + rope] (rotated) over each row's cached latent
        [R, S, C] and rope key [R, S, P], where visible [R, T, S] says: into latent space per head (w_k), scores over
        the latent plus the rope part, softmax in fp32, back out per head (w_v); out [R * T, H, V]. Batched products,
        not einsums (which permute and reshape around each); the softmax scale goes on the (smaller) queries."""
        rows, width, heads, _ = q.shape
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        w_k, w_v = wkv_b[:, : self.nope_dim], wkv_b[:, self.nope_dim :]
        q_latent = torch.bmm(q_nope.flatten(0, 1).transpose(0, 1), w_k).mul_(self.softmax_scale)  # [H, R*T, C]
        q_latent = q_latent.view(heads, rows, width, -1).permute(1, 2, 0, 3).reshape(rows, width * heads, -1)
        q_pe = (q_pe * self.softmax_scale).reshape(rows, width * heads, -1)
        scores = torch.bmm(q_latent, latent.mT).baddbmm_(q_pe, pe.mT).view(rows, width, heads, -1).float()
        probs = scores.masked_fill_(~visible.unsqueeze(2), float("-inf")).softmax(dim=-1).to(q.dtype)
        mixed = torch.bmm(probs.view(rows, width * heads, -1), latent)  # [R, T*H, C]
        return torch.bmm(mixed.view(-1, heads, self.kv_lora_rank).transpose(0, 1), w_v.mT).transpose(0, 1)

    def expanded(
        self, q: torch.Tensor, wkv_b: torch.Tensor, latent: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The absorbed cache taken to per-head form for rows of queries q [R, T, H, D]: keys [R, S, H, D] and
        values [R, S, H, V] from latent [R, S, C] and rope key [R, S, P]; (q, keys, values) for dense()."""
        k_nope, v = self.expand(latent, wkv_b)
        return q, torch.cat([k_nope, pe.unsqueeze(2).expand(-1, -1, self.local_heads, -1)], dim=-1), v

    def dense(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, pad_v: bool = False
    ) -> torch.Tensor:
        """Attention of q [R, T, H, D] over per-head k [R, S, H, D] and v [R, S, H, Dv] where visible [R, T, S]
        says, or causal over the first T keys when visible is None; out [R, T, H, Dv]. pad_v: v zero-padded to D
        (the CPU's fused SDPA kernel wants v as wide as q and k, else takes its unfused path) and cut back."""
        v_dim, width = v.shape[-1], q.shape[1]
        if pad_v and v_dim < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        if visible is None:
            k, v = k[:, :width], v[:, :width]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if visible is None else visible.unsqueeze(1),
            is_causal=visible is None,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., :v_dim]
