"""The cpu backend: fp32 on the CPU through the compiled kernels (tp_infer/model/kernels.c) and oneDNN's products.

A decode step or a short extend is a few rows through many small layers, where each PyTorch op costs tens of
microseconds of dispatch and MKL reads a thin product's weight on one core; so each layer's up to MAX_ROWS rows go
through one compiled call (products, SwiGLU, RMSNorm, rotary embedding, the router and the experts, and MLA decode
over the pool's blocks in place, storing the step's new entries on the way). Prefills and extends attend in
kernels.extend_attention or oneDNN's products (which on AMD processors run AVX-512 where MKL stays with AVX2).
Whatever these do not cover (another dtype, too many rows, the kernels not built or switched off) goes to the torch
reference, the base class; the choice is made before any weight is dequantised or argument built."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from tp_infer.backends.reference import Backend, rows_of
from tp_infer.model import kernels

if TYPE_CHECKING:
    from tp_infer.kv.pool import LayerCache
    from tp_infer.model.attention import MLA, IndexQueries
    from tp_infer.model.batch import AttentionGroup, ForwardBatch
    from tp_infer.model.moe import MLP, Experts, Gate

# new tokens per row from which padding v for the CPU's fused SDPA kernel beats its unfused path: from 32 it won at
# every MLA shape measured here; a decode-sized row pays more for the copy
PAD_V_FROM = 32
# queries per product in chunked_attention: a chunk's scores stay in cache, and the keys past its last query are
# skipped (256 was fastest at 1,000 new tokens, bench model)
QUERY_CHUNK = 256


class CpuBackend(Backend):
    name = "cpu"

    def prepare(self) -> str:
        """Build the kernels (or load them from the cache) now, not inside the first turn."""
        start = time.perf_counter()
        ready = kernels.library() is not None
        took = time.perf_counter() - start
        if not ready:
            return "backend cpu: compiled kernels unavailable (see the warning above); PyTorch's ops instead"
        onednn = "on" if kernels.onednn_products() else "off"
        return f"backend cpu: compiled kernels ready in {took:.2f} s, oneDNN products {onednn}"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.linear(x, self.dense_weight(weight, scale, x.dtype))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y = kernels.rms_norm(x, weight, eps) if x.dtype == torch.float32 else None
        return y if y is not None else super().rms_norm(x, weight, eps)

    def rope(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        y = kernels.rope(x, torch.view_as_complex(rotations))  # (cos, sin) pairs as the kernels read them
        return y if y is not None else super().rope(x, rotations)

    def route(self, x: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
        rules = (gate.score_func == "sigmoid", gate.n_groups, gate.topk_groups, gate.topk)
        routed = kernels.route(x, gate.weight, gate.bias, *rules, gate.route_norm, gate.route_scale)
        return routed if routed is not None else super().route(x, gate)

    def swiglu(self, x: torch.Tensor, mlp: MLP) -> torch.Tensor:
        y = kernels.swiglu(x, *self.swiglu_weights(mlp.layers(), x.dtype)) if kernels.rows_fit(x) else None
        return y if y is not None else super().swiglu(x, mlp)

    def swiglu_weights(self, layers, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A SwiGLU's (w1, w3, w2) in `dtype`, as the compiled kernels take them, from its (weight, scale) pairs."""
        return tuple(self.dense_weight(weight, scale, dtype) for weight, scale in layers)

    def experts(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts, shared: MLP | None
    ) -> torch.Tensor:
        """Up to MAX_ROWS tokens: the shared and the chosen routed experts in one compiled call (only the chosen
        experts' weights dequantised, when FP8). More: the reference's (in fp32 each expert on its run of tokens,
        in this backend's products: oneDNN's)."""
        if kernels.rows_fit(x):
            chosen = {e for e in indices.flatten().tolist() if experts.first <= e < experts.first + experts.count}
            routed = {e: self.swiglu_weights(experts.of(e - experts.first), x.dtype) for e in chosen}
            dense_shared = None if shared is None else self.swiglu_weights(shared.layers(), x.dtype)
            y = kernels.moe(x, weights, indices, routed, dense_shared)
            if y is not None:
                return y
        return super().experts(x, weights, indices, experts, shared)

    def attention(
        self,
        mla: MLA,
        q: torch.Tensor,
        kv: torch.Tensor,
        batch: ForwardBatch,
        cache: LayerCache,
        rotations,
        index: IndexQueries | None = None,
    ) -> torch.Tensor:
        """A step of decode rows alone, over no more positions than the indexer (if any) lets a query see: one
        compiled call that also stores the new entries (normalised, rotated; naive: taken to keys and values) and
        rotates the queries, where it applies (it declines before storing anything); an indexer key is stored
        beside. Otherwise the reference's store, then each group here."""
        wkv_b = mla.wkv_b_heads(q.dtype)
        group = batch.groups[0]
        if len(batch.groups) == 1 and group.width == 1 and not mla.narrows(group.visible.shape[-1]):
            q_nope, q_pe = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
            pairs = torch.view_as_complex(rotations)
            new = kernels.NewEntries(kv, mla.kv_norm.weight, mla.kv_norm.eps, pairs, batch.slots)
            decode = kernels.mla_decode if mla.attn_impl == "absorb" else kernels.mha_decode
            attended = cache.data[: mla.attended]
            out = decode(q_nope, q_pe, wkv_b, *attended, group.block_table, group.lengths, mla.softmax_scale, new)
            if out is not None:
                if index is not None:
                    cache.tensors[mla.attended].write(batch.slots, index.key)
                return out
        return self.store_and_attend(mla, q, kv, batch, cache, rotations, wkv_b, index)

    def attend(
        self,
        mla: MLA,
        q: torch.Tensor,
        wkv_b: torch.Tensor,
        cache: LayerCache,
        group: AttentionGroup,
        index: IndexQueries | None = None,
    ) -> torch.Tensor:
        """Decode rows in the compiled kernels, reading the pool in place (or, where V3.2's indexer narrows what they
        see, over their selected entries gathered); other rows in extend_attention or oneDNN's products where they
        apply (fp32, no narrowing), else the reference's."""
        narrowed = mla.narrows(group.visible.shape[-1])
        if group.width == 1:
            out = self.decode(mla, q[group.start : group.end], wkv_b, cache, group, index if narrowed else None)
            if out is not None:
                return out
        if not kernels.onednn_for(q, wkv_b) or (narrowed and mla.attn_impl == "naive"):
            return super().attend(mla, q, wkv_b, cache, group, index)
        q = rows_of(q, group)
        cached = cache.read(group.block_table, q.dtype, group.first_block, mla.attended)
        if narrowed:  # absorbed, each query over the positions the indexer selected for it
            return latent_attention(mla, q, wkv_b, *cached, group, self.selected(mla, cache, group, index))
        if mla.attn_impl == "naive":
            return self.dense(mla, q, *cached, group).flatten(0, 1)
        if mla.expanding_is_cheaper(group.width, group.visible.shape[-1]):
            return self.dense(mla, *mla.expanded(q, wkv_b, *cached), group).flatten(0, 1)
        return latent_attention(mla, q, wkv_b, *cached, group)

    def decode(
        self,
        mla: MLA,
        q: torch.Tensor,
        wkv_b: torch.Tensor,
        cache: LayerCache,
        group: AttentionGroup,
        index: IndexQueries | None,
    ) -> torch.Tensor | None:
        """Decode rows q [R, H, nope + rope] in the compiled kernels: over each row's blocks in place, or, given the
        indexer's queries, over the entries of the positions it selects, gathered into one block per row (attention
        over a set of positions does not depend on their order). None where the kernels do not apply."""
        q_nope, q_pe = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
        decode = kernels.mla_decode if mla.attn_impl == "absorb" else kernels.mha_decode
        operands = (wkv_b,) if mla.attn_impl == "absorb" else (None,)
        attended, block_table, lengths = cache.data[: mla.attended], group.block_table, group.lengths
        if index is not None:
            if cache.tensors[0].fp8:
                return None  # the kernels read the compute dtype only
            attended, lengths = selected_entries(mla, cache, group, index)
            block_table = torch.arange(q.shape[0]).unsqueeze(1)
        return decode(q_nope, q_pe, *operands, *attended, block_table, lengths, mla.softmax_scale)

    def dense(self, mla: MLA, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """Per-head attention in oneDNN's products (chunked_attention) where they apply, else SDPA."""
        if kernels.onednn_for(q, k, v):
            return chunked_attention(q, k, v, group, mla.softmax_scale)
        visible = None if group.causal else group.visible
        return mla.dense(q, k, v, visible, pad_v=q.shape[1] >= PAD_V_FROM)


def selected_entries(
    mla: MLA, cache: LayerCache, group: AttentionGroup, index: IndexQueries
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For decode rows whose view the indexer narrows: each attended quantity's entries at the positions a row
    selects (kernels.index_topk, reading the indexer keys in place; else the torch backend's selection), in ascending
    order, as one block per row [R, topk, ...], and how many each row selected [R] (int64)."""
    block_size, topk = cache.tensors[0].data.shape[1], mla.indexer.topk
    keys = cache.tensors[mla.attended]
    q, weights = rows_of(index.q, group), rows_of(index.weights, group)  # [R, 1, ...]: one new token a row
    picked = kernels.index_topk(q[:, 0], weights[:, 0], keys.data, group.block_table, group.lengths, topk)
    if picked is None:
        keys = keys.read(group.block_table, torch.float32, group.first_block)
        chosen = mla.indexer.select(q, weights, keys, group.visible)[:, 0]
        span = torch.arange(chosen.shape[1])
        order = torch.where(chosen, span, span + chosen.shape[1])  # the chosen positions first, each part ascending
        picked = order.topk(topk, dim=-1, largest=False, sorted=True).indices, chosen.sum(dim=-1)
    positions, counts = picked  # past a row's count, positions it may read and does not attend to
    slots = (group.block_table.gather(1, positions // block_size) * block_size + positions % block_size).flatten()
    entries = [
        t.flatten(0, 1).index_select(0, slots).view(len(counts), topk, *t.shape[2:]) for t in cache.data[: mla.attended]
    ]
    return entries, counts


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Attention of q [R, T, H, D] over k [R, S, H, D] and v [R, S, H, Dv] (S covering each row's positions): per
    row in kernels.extend_attention where it applies (the keys and values read where they lie), else in plain
    products per row and head: each QUERY_CHUNK queries' scores over the keys the chunk's last query sees (so most of
    the causal triangle's hidden half is never computed), the chunk's own columns masked by group.visible, softmax,
    times the values."""
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
    mla: MLA,
    q: torch.Tensor,
    wkv_b: torch.Tensor,
    latent: torch.Tensor,
    pe: torch.Tensor,
    group: AttentionGroup,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed attention of q [R, T, H, nope + rope] (rotated) over each row's cached latent [R, S, C] and rope key
    [R, S, P], with wkv_b [H, nope + v, C], in plain products (oneDNN's): into latent space in one batched product
    over the heads, per row over its positions (in kernels.extend_attention where it applies, else in products with
    the scores rows token-major: (t, h)), back out per head; out [R * T, H, V]. selected [R, T, S]: the positions
    each query attends to where V3.2's indexer narrowed them (in products, the whole mask applied)."""
    rows, width, heads, _ = q.shape
    nope, scale = mla.nope_dim, mla.softmax_scale
    q_nope, q_pe = q.split([nope, mla.rope_dim], dim=-1)
    out = q.new_empty(rows, width, heads, mla.v_dim)
    for r, length in enumerate(group.lengths.tolist()):
        q_latent = torch.bmm(head_major(q_nope[r]), wkv_b[:, :nope]).transpose(0, 1)  # [T, H, C], heads apart
        keys, rope_keys = latent[r, :length], pe[r, :length]
        mixed = q_latent.new_empty(width, heads, latent.shape[-1])
        if selected is not None:
            mixed = products_over_latent(q_latent, q_pe[r], keys, rope_keys, selected[r], scale, narrowed=True)
        elif not kernels.extend_attention(
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
    narrowed: bool = False,
) -> torch.Tensor:
    """One row's absorbed attention in products: q_latent [T, H, C] and q_pe [T, H, P] over keys [S, C] and
    rope_keys [S, P], visible [T, S]; the mixed latents [T, H, C]. Only the new positions are hidden from anyone,
    unless narrowed (by V3.2's indexer), where the whole mask applies."""
    (width, heads, _), length = q_latent.shape, keys.shape[0]
    first = 0 if narrowed else length - width
    scores = kernels.linear(q_latent.reshape(width * heads, -1), keys)
    scores += kernels.linear(q_pe.reshape(width * heads, -1), rope_keys)
    scores = scores.mul_(scale).view(width, heads, length)
    hidden = ~visible[:, first:length]
    scores[..., first:].masked_fill_(hidden.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1).view(width * heads, length)
    return kernels.linear(probs, keys.t()).view(width, heads, -1)


def head_major(x: torch.Tensor) -> torch.Tensor:
    """x [S, H, D] as a contiguous [H, S, D]: each head's rows in one matrix."""
    return x.transpose(0, 1).contiguous()
