"""Multi-head latent attention (MLA) over the paged KV pool, in DeepSeek's naive and absorb forms."""

import torch
import torch.nn.functional as F
from torch import nn

from tp_infer.config import ModelArgs
from tp_infer.kv.pool import LayerCache
from tp_infer.model import kernels
from tp_infer.model.batch import AttentionGroup, ForwardBatch
from tp_infer.model.layers import ColumnParallelLinear, Linear, RMSNorm, RowParallelLinear, TensorParallel
from tp_infer.model.rope import apply_rope

# new tokens per row from which padding v for the CPU's fused kernel beats SDPA's unfused path: from 32 it won at
# every MLA shape measured here (1.1-1.6x, 1.4x at 1,000 tokens); a decode-sized row pays more for the copy
PAD_V_FROM = 32
# queries per product in chunked_attention: at 1,000 new tokens 256 beat 128 and 1,000 (13 ms a layer against 17
# and 16 at the bench model's shapes): a chunk's scores stay in cache, and the keys past its last query are skipped
QUERY_CHUNK = 256


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

    @staticmethod
    def cache_shapes(args: ModelArgs, world_size: int) -> list[tuple[int, ...]]:
        """What each token leaves in a layer's cache on each rank. absorb: the latent and the rope key, the same on
        every rank; naive: the local heads' keys and values."""
        if args.attn_impl == "absorb":
            return [(args.kv_lora_rank,), (args.qk_rope_head_dim,)]
        heads = args.n_heads // world_size
        return [(heads, args.qk_head_dim), (heads, args.v_head_dim)]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, rotations: torch.Tensor) -> torch.Tensor:
        """x [N, dim]: the step's new tokens; rotations [N, rope_dim / 2] (complex) at their positions."""
        n = x.shape[0]
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(n, self.local_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv = self.wkv_a(x)
        wkv_b = self.wkv_b.dense_weight(x.dtype).view(self.local_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        if len(batch.groups) == 1 and batch.groups[0].width == 1:
            out = self.decode(q_nope, q_pe, kv, wkv_b, batch, cache, rotations)
            if out is not None:
                return self.wo(out.flatten(1))
        q_pe.copy_(apply_rope(q_pe, rotations))  # in place: q is then the whole query, nothing joined
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = apply_rope(k_pe, rotations)
        if self.attn_impl == "naive":
            k_nope, v = self.expand(latent, wkv_b)
            cache.write(batch.slots, torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.local_heads, -1)], -1), v)
            outs = [self.naive_group(q, cache, g) for g in batch.groups]
        else:
            cache.write(batch.slots, latent, k_pe)
            outs = [self.absorb_group(q, wkv_b, cache, g) for g in batch.groups]
        return self.wo((outs[0] if len(outs) == 1 else torch.cat(outs)).flatten(1))

    def decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv: torch.Tensor,
        wkv_b: torch.Tensor,
        batch: ForwardBatch,
        cache: LayerCache,
        rotations: torch.Tensor,
    ) -> torch.Tensor | None:
        """A step of decode rows alone in one compiled call that also stores the new entries (normalised, rotated;
        naive: taken to keys and values) and rotates the queries; None where the kernel does not apply, before
        anything is stored."""
        group = batch.groups[0]
        new = kernels.NewEntries(kv, self.kv_norm.weight, self.kv_norm.eps, rotations, batch.slots)
        attend = kernels.mla_decode if self.attn_impl == "absorb" else kernels.mha_decode
        return attend(q_nope, q_pe, wkv_b, *cache.data, group.block_table, group.lengths, self.softmax_scale, new)

    def naive_group(self, query: torch.Tensor, cache: LayerCache, group: AttentionGroup) -> torch.Tensor:
        """Attention of one group's queries over its rows' per-head keys and values (decode rows in the compiled
        kernel where it applies, reading the pool in place)."""
        if group.width == 1:
            rows = query[group.start : group.end]
            q_nope, q_pe = rows[..., : self.nope_dim], rows[..., self.nope_dim :]
            out = kernels.mha_decode(
                q_nope, q_pe, None, *cache.data, group.block_table, group.lengths, self.softmax_scale
            )
            if out is not None:
                return out
        k, v = cache.read(group.block_table, query.dtype, group.first_block)
        return self.multi_head_attention(rows_of(query, group), k, v, group).flatten(0, 1)

    def absorb_group(
        self, q: torch.Tensor, wkv_b: torch.Tensor, cache: LayerCache, group: AttentionGroup
    ) -> torch.Tensor:
        """Attention of one group's queries (q [N, H, nope + rope], rotated) in the absorbed form (latent space;
        decode rows in the compiled kernel where it applies), or, when it costs fewer FLOPs, by expanding the cached
        latent to per-head keys and values."""
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        if group.width == 1:  # the kernel reads the pool's blocks in place: nothing gathered
            queries = (q_nope[group.start : group.end], q_pe[group.start : group.end])
            out = kernels.mla_decode(*queries, wkv_b, *cache.data, group.block_table, group.lengths, self.softmax_scale)
            if out is not None:
                return out
        q_nope, q_pe = rows_of(q_nope, group), rows_of(q_pe, group)  # [R, T, H, *]
        if self.expanding_is_cheaper(group.width, group.visible.shape[-1]):
            latent, pe = cache.read(group.block_table, q_nope.dtype, group.first_block)  # [R, S, C], [R, S, rope]
            k_nope, v = self.expand(latent, wkv_b)
            k = torch.cat([k_nope, pe.unsqueeze(2).expand(-1, -1, self.local_heads, -1)], dim=-1)
            out = self.multi_head_attention(rows_of(q, group), k, v, group)
            return out.flatten(0, 1)
        if kernels.onednn_for(q_nope, wkv_b):
            return latent_attention(q_nope, q_pe, wkv_b, cache, group, self.softmax_scale)
        # batched products, not einsums (which permute and reshape around each): per head into latent space, per row
        # over its cache; the softmax scale goes on the (smaller) queries; latent and rope key are read where they
        # lie, not joined
        w_k, w_v = wkv_b[:, : self.nope_dim], wkv_b[:, self.nope_dim :]
        rows, width, heads, latent_dim = group.rows, group.width, self.local_heads, self.kv_lora_rank
        q_latent = torch.bmm(q_nope.flatten(0, 1).transpose(0, 1), w_k).mul_(self.softmax_scale)  # [H, R*T, C]
        q_latent = q_latent.view(heads, rows, width, latent_dim).permute(1, 2, 0, 3).reshape(rows, -1, latent_dim)
        q_pe = (q_pe * self.softmax_scale).view(rows, width * heads, -1)
        latent, pe = cache.read(group.block_table, q_nope.dtype, group.first_block)  # [R, S, C], [R, S, rope]
        scores = torch.bmm(q_latent, latent.mT).baddbmm_(q_pe, pe.mT).view(rows, width, heads, -1).float()
        probs = scores.masked_fill_(~group.visible.unsqueeze(2), float("-inf")).softmax(dim=-1).to(q_nope.dtype)
        out = torch.bmm(probs.view(rows, width * heads, -1), latent)  # [R, T*H, C]
        return torch.bmm(out.view(-1, heads, latent_dim).transpose(0, 1), w_v.mT).transpose(0, 1)  # [R*T, H, V]

    def expand(self, latent: torch.Tensor, wkv_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head k_nope [..., H, nope] and v [..., H, v] of latents [..., C], in one product with wkv_b
        [H, nope + v, C]."""
        kv = kernels.linear(latent.flatten(0, -2), wkv_b.flatten(0, 1))
        return kv.view(*latent.shape[:-1], self.local_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)

    def multi_head_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup
    ) -> torch.Tensor:
        """Attention of q [B, T, H, D] over per-head k [B, S, H, D] and v [B, S, H, Dv], as the group's visibility
        says: in oneDNN's products where they apply (chunked_attention), else fused by SDPA. The CPU's fused kernel
        wants v as wide as q and k (otherwise SDPA takes its unfused path), so from PAD_V_FROM new tokens per row,
        where that pays for the copy, v is zero-padded and the output cut back. Rows that start at position 0 attend
        by is_causal over their own tokens, with no mask to read."""
        if kernels.onednn_for(q, k, v):
            return chunked_attention(q, k, v, group, self.softmax_scale)
        v_dim, width = v.shape[-1], q.shape[1]
        if v_dim < q.shape[-1] and width >= PAD_V_FROM and q.device.type == "cpu":
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        if group.causal:
            k, v = k[:, :width], v[:, :width]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if group.causal else group.visible.unsqueeze(1),
            is_causal=group.causal,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)[..., :v_dim]

    def expanding_is_cheaper(self, new_tokens: int, kv_len: int) -> bool:
        """Whether an absorb-mode forward costs fewer FLOPs by expanding the cached latent to per-head keys and
        values once (kv_len x latent x (nope + v)) than by attending in latent space (new x kv_len x 2 latent).
        True for long prefills (over ~170 new tokens on a long history at V3's shapes), never for decode."""
        absorb = new_tokens * (self.kv_lora_rank * (self.nope_dim + self.v_dim + 2 * kv_len) + kv_len * self.rope_dim)
        expand = kv_len * (self.kv_lora_rank + new_tokens) * (self.nope_dim + self.v_dim) + (
            new_tokens * kv_len * self.rope_dim
        )
        return expand < absorb


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Attention of q [R, T, H, D] over k [R, S, H, D] and v [R, S, H, Dv] (S covering each row's positions): per
    row in kernels.extend_attention where it applies (the keys and values read where they lie), else in plain
    products per row and head: each QUERY_CHUNK queries' scores over the keys the chunk's last query sees (so most of
    the causal triangle's hidden half is never computed), the chunk's own columns masked by group.visible, softmax,
    times the values. On the CPU in fp32 these products run in oneDNN at twice the speed of the MKL products inside
    SDPA's fused kernel (on AMD processors, where MKL stays with AVX2)."""
    rows, width, heads, _ = q.shape
    out = q.new_empty(rows, width, heads, v.shape[-1])
    for r, length in enumerate(group.lengths.tolist()):
        if kernels.extend_attention((q[r],), (k[r, :length],), v[r, :length], out[r], scale):
            continue
        first = length - width  # the row's first new position: every key before it is seen by all its queries
        queries = torch.mul(q[r].transpose(0, 1), scale, out=q.new_empty(heads, width, q.shape[-1]))
        keys, values = head_major(k[r, :length]), head_major(v[r, :length])
        for start in range(0, width, QUERY_CHUNK):
            end = min(start + QUERY_CHUNK, width)
            seen, hidden = first + end, ~group.visible[r, start:end, first + start : first + end]
            for h in range(heads):
                scores = kernels.linear(queries[h, start:end], keys[h, :seen])
                scores[:, first + start :].masked_fill_(hidden, float("-inf"))
                out[r, start:end, h] = kernels.linear(scores.softmax(dim=-1), values[h, :seen].t())
    return out


def latent_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    wkv_b: torch.Tensor,
    cache: LayerCache,
    group: AttentionGroup,
    scale: float,
) -> torch.Tensor:
    """Absorbed attention of q_nope [R, T, H, D] and q_pe [R, T, H, P] (rotated) over each row's cached latent and
    rope key, with wkv_b [H, D + V, C], in plain products (oneDNN's on the CPU, see chunked_attention): into latent
    space in one batched product over the heads, per row over its positions (in kernels.extend_attention where it
    applies, else in products with the scores rows token-major: (t, h)), back out per head; the output
    [R * T, H, V]."""
    rows, width, heads, nope = q_nope.shape
    v_dim = wkv_b.shape[1] - nope
    out = q_nope.new_empty(rows, width, heads, v_dim)
    latent, pe = cache.read(group.block_table, q_nope.dtype, group.first_block)  # [R, S, C], [R, S, P]
    for r, length in enumerate(group.lengths.tolist()):
        q_latent = torch.bmm(head_major(q_nope[r]), wkv_b[:, :nope]).transpose(0, 1)  # [T, H, C], heads apart
        keys, rope_keys = latent[r, :length], pe[r, :length]
        mixed = q_latent.new_empty(width, heads, latent.shape[-1])
        if not kernels.extend_attention(
            (q_latent, q_pe[r]), (keys[:, None], rope_keys[:, None]), keys[:, None], mixed, scale
        ):
            mixed = products_over_latent(q_latent, q_pe[r], keys, rope_keys, group.visible[r], scale)
        mixed = head_major(mixed)  # [H, T, C]
        for h in range(heads):
            out[r, :, h] = kernels.linear(mixed[h], wkv_b[h, nope:])
    return out.flatten(0, 1)


def products_over_latent(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    keys: torch.Tensor,
    rope_keys: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One row's absorbed attention in products: q_latent [T, H, C] and q_pe [T, H, P] over keys [S, C] and
    rope_keys [S, P], visible [T, S]; the mixed latents [T, H, C]."""
    (width, heads, _), length = q_latent.shape, keys.shape[0]
    first = length - width
    scores = kernels.linear(q_latent.reshape(width * heads, -1), keys)
    scores += kernels.linear(q_pe.reshape(width * heads, -1), rope_keys)
    scores = scores.mul_(scale).view(width, heads, length)
    hidden = ~visible[:, first:length]  # only the new positions are hidden from anyone
    scores[..., first:].masked_fill_(hidden.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1).view(width * heads, length)
    return kernels.linear(probs, keys.t()).view(width, heads, -1)


def head_major(x: torch.Tensor) -> torch.Tensor:
    """x [S, H, D] as a contiguous [H, S, D]: each head's rows in one matrix."""
    return x.transpose(0, 1).contiguous()


def rows_of(x: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """The group's tokens of a stream tensor [N, ...], as [rows, width, ...]."""
    return x[group.start : group.end].view(group.rows, group.width, *x.shape[1:])
