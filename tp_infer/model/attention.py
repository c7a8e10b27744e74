"""Multi-head latent attention (MLA) over a slotted KV cache, in DeepSeek's naive and absorb forms."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.kv.pool import CacheTensor
from tp_infer.model.layers import ColumnParallelLinear, Linear, RMSNorm, RowParallelLinear, TensorParallel
from tp_infer.model.rope import apply_rope

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}  # "auto": compute dtype


@dataclass
class AttentionBatch:
    """Where a forward's tokens sit: rows are cache slots, each row at its own start position (new tokens padded)."""

    slots: torch.Tensor  # [B] cache slot of each row
    positions: torch.Tensor  # [B, T] absolute position of each new token
    valid: torch.Tensor  # [B, T] False on padding
    visible: torch.Tensor  # [B, T, S] causal mask: True where a new token may attend, over S = kv_len positions
    cos: torch.Tensor  # [B, T, rope_dim / 2]
    sin: torch.Tensor
    slot_range: slice | None  # the slots as a contiguous range, when they are one (read the cache as a view)

    def write(self, cache: torch.Tensor, values: torch.Tensor) -> None:
        """Store the valid tokens' values [B, T, ...] at their positions in their slots."""
        rows = self.slots[:, None].expand_as(self.positions)
        cache[rows[self.valid], self.positions[self.valid]] = values[self.valid].to(cache.dtype)

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        """The rows' first S = kv_len cached positions, [B, S, ...]."""
        kv_len = self.visible.shape[-1]
        if self.slot_range is not None:
            return cache[self.slot_range, :kv_len]
        return cache[self.slots, :kv_len]


class MLA(nn.Module):
    """Latent attention on this rank's heads. naive caches per-head k/v; absorb caches the shared latent and
    rope key and folds wkv_b into the query and the output."""

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
        slots, seq, cache_dtype = args.max_batch_size, args.max_seq_len, CACHE_DTYPES.get(args.kv_cache_dtype, dtype)
        if self.attn_impl == "naive":
            self.k_cache = CacheTensor(slots, seq, (self.local_heads, args.qk_head_dim), cache_dtype)
            self.v_cache = CacheTensor(slots, seq, (self.local_heads, self.v_dim), cache_dtype)
        else:
            self.kv_cache = CacheTensor(slots, seq, (self.kv_lora_rank,), cache_dtype)
            self.pe_cache = CacheTensor(slots, seq, (self.rope_dim,), cache_dtype)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.local_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, batch.cos, batch.sin)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = apply_rope(k_pe, batch.cos, batch.sin)
        wkv_b = self.wkv_b.dense_weight(x.dtype).view(self.local_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = wkv_b[:, : self.nope_dim], wkv_b[:, self.nope_dim :]
        if self.attn_impl == "naive":
            k_nope, v = torch.einsum("btc,hdc->bthd", latent, wkv_b).split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.local_heads, -1)], dim=-1)
            self.k_cache.write(batch, k)
            self.v_cache.write(batch, v)
            k, v = self.k_cache.read(batch, x.dtype), self.v_cache.read(batch, x.dtype)
            out = self.multi_head_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, batch)
            return self.wo(out.flatten(2))
        self.kv_cache.write(batch, latent)
        self.pe_cache.write(batch, k_pe)
        kv_cache, pe_cache = self.kv_cache.read(batch, x.dtype), self.pe_cache.read(batch, x.dtype)
        if self.expanding_is_cheaper(seqlen, kv_cache.shape[1]):
            k_nope = torch.einsum("bsc,hdc->bshd", kv_cache, w_k)
            k = torch.cat([k_nope, pe_cache.unsqueeze(2).expand(-1, -1, self.local_heads, -1)], dim=-1)
            v = torch.einsum("bsc,hdc->bshd", kv_cache, w_v)
            out = self.multi_head_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, batch)
            return self.wo(out.flatten(2))
        # one product over latent and rope key together, the softmax scale applied to the (smaller) query
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_k)
        query = torch.cat([q_latent, q_pe], dim=-1) * self.softmax_scale
        scores = torch.einsum("bthc,bsc->bths", query, torch.cat([kv_cache, pe_cache], dim=-1)).float()
        probs = scores.masked_fill_(~batch.visible.unsqueeze(2), float("-inf")).softmax(dim=-1).to(x.dtype)
        out = torch.einsum("bthc,hdc->bthd", torch.einsum("bths,bsc->bthc", probs, kv_cache), w_v)
        return self.wo(out.flatten(2))

    def multi_head_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Fused causal attention of q [B, T, H, D] over per-head k [B, S, H, D] and v [B, S, H, Dv]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=batch.visible.unsqueeze(1),
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)

    def expanding_is_cheaper(self, new_tokens: int, kv_len: int) -> bool:
        """Whether an absorb-mode forward costs fewer FLOPs by expanding the cached latent to per-head keys and
        values once (kv_len x latent x (nope + v)) than by attending in latent space (new x kv_len x 2 latent).
        True for long prefills (over ~170 new tokens on a long history at V3's shapes), never for decode."""
        absorb = new_tokens * (self.kv_lora_rank * (self.nope_dim + self.v_dim + 2 * kv_len) + kv_len * self.rope_dim)
        expand = kv_len * (self.kv_lora_rank + new_tokens) * (self.nope_dim + self.v_dim) + (
            new_tokens * kv_len * self.rope_dim
        )
        return expand < absorb
