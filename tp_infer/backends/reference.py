"""The torch backend: every hardware path in plain PyTorch ops, on any device. It is the reference the other backends
are tested against, and it never synchronises with the host inside a forward: the routed experts are sorted and
multiplied on the device (one grouped product per weight), attention reads each row's blocks through its block table
with the rows' lengths as a mask, and nothing is read back to choose a path. So a decode step compiles whole with
torch.compile(fullgraph=True) and can be replayed as a CUDA graph."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tp_infer.model import fp8
from tp_infer.model.rope import apply_rope

if TYPE_CHECKING:
    from tp_infer.kv.pool import LayerCache
    from tp_infer.model.attention import MLA, IndexQueries
    from tp_infer.model.batch import AttentionGroup, ForwardBatch
    from tp_infer.model.moe import MLP, Experts, Gate


class Backend:
    """What the model asks of the hardware, in PyTorch's ops (the `torch` backend). Subclasses override what they do
    faster and call these for the rest."""

    name = "torch"

    def prepare(self) -> str:
        """One-time work, done at start-up rather than inside the first turn; a line saying what was done."""
        return f"backend {self.name}: PyTorch's ops"

    # -- products --------------------------------------------------------------------------------------------------
    def dense_weight(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """A weight [N, K] (or a stack [E, N, K]) in `dtype`: dequantised in one pass when FP8 (scale given)."""
        return weight if scale is None else fp8.dequantize(weight, scale, dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] times weight [N, K] transposed; an FP8 weight (with its 128x128 block scales) is multiplied
        directly by torch's block-scaled product where the device has it, else dequantised once."""
        if scale is not None and block_fp8_product(x, weight):
            return scaled_linear(x, weight, scale)
        return F.linear(x, self.dense_weight(weight, scale, x.dtype))

    # -- small ops -------------------------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension, computed in fp32."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], weight, eps)
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)

    def rope(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """x [N, H, D] or [N, D] rotated pairwise by rotations [N, D / 2, 2] (cos, sin)."""
        return apply_rope(x, rotations)

    def rope_(self, x: torch.Tensor, rotations: torch.Tensor) -> None:
        """rope() in place (x may be a view, such as the rope part of each head's query)."""
        x.copy_(self.rope(x, rotations))

    # -- feed-forward ----------------------------------------------------------------------------------------------
    def swiglu(self, x: torch.Tensor, mlp: MLP) -> torch.Tensor:
        """w2(silu(w1(x)) * w3(x)) over this rank's slices, not reduced."""
        return mlp.w2(F.silu(mlp.w1(x)).mul_(mlp.w3(x)))

    def route(self, x: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [N, topk] and expert indices [N, topk]."""
        return gate.route(x)

    def experts(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts, shared: MLP | None
    ) -> torch.Tensor:
        """This rank's share of the mixture for x [N, dim], not reduced: each token's chosen local experts times
        their routing weights, plus the shared expert. On the device, with nothing read back: the (token, choice)
        pairs sorted by expert, the pairs of other ranks' experts last and masked out, each weight in one grouped
        product with the experts' offsets (bf16, F.grouped_mm's dtype), or, with FP8 weights and fewer pairs than
        experts, or for decode-sized steps in other dtypes, one batched product per pair over only the chosen
        experts' weights. A long step in another dtype (an fp32 prefill) runs each expert on its run of tokens, the
        runs' lengths read back (expert_runs)."""
        n, k = indices.shape
        if x.dtype != torch.bfloat16 and n * k > experts.count:
            return self.expert_runs(x, weights, indices, experts, shared)
        local = indices.flatten() - experts.first
        mine = (local >= 0) & (local < experts.count)
        group = torch.where(mine, local, experts.count)  # other ranks' experts after every local one
        order = group.argsort(stable=True)
        rows = order // k
        tokens = x.index_select(0, rows)
        scale = weights.flatten().index_select(0, order)[:, None]
        if x.dtype != torch.bfloat16 or (experts.fp8 and n * k < experts.count):
            out = self.pairs_through_experts(tokens, group.index_select(0, order), experts, scale)
        else:
            counts = torch.zeros(experts.count + 1, dtype=torch.int32, device=x.device)
            counts.index_add_(0, group, torch.ones_like(group, dtype=torch.int32))
            out = self.grouped_experts(tokens, counts[:-1].cumsum(0, dtype=torch.int32), experts, scale)
        out = torch.where(mine.index_select(0, order)[:, None], out, 0)
        y = torch.zeros_like(x).index_add_(0, rows, out)
        return y if shared is None else y + self.swiglu(x, shared)

    def expert_runs(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts, shared: MLP | None
    ) -> torch.Tensor:
        """The shared expert, then each local expert once on a contiguous run of its tokens (the pairs sorted by
        expert, stably, the runs' lengths read back to the host), its routing weights applied to its hidden values,
        its outputs added to their tokens in ascending expert order."""
        y = torch.zeros_like(x) if shared is None else self.swiglu(x, shared)
        choices = indices.flatten()
        counts = torch.bincount(choices, minlength=experts.first + experts.count).tolist()
        local = counts[experts.first : experts.first + experts.count]
        first = sum(counts[: experts.first])
        pairs = choices.argsort(stable=True)[first : first + sum(local)]
        rows, scales = pairs // indices.shape[1], weights.flatten()[pairs, None]
        tokens, start = x.index_select(0, rows), 0
        for e, count in enumerate(local):
            end = start + count
            if count:
                (w1, s1), (w3, s3), (w2, s2) = experts.of(e)
                part = tokens[start:end]
                hidden = F.silu(self.linear(part, w1, s1)).mul_(self.linear(part, w3, s3)).mul_(scales[start:end])
                y.index_add_(0, rows[start:end], self.linear(hidden, w2, s2))
            start = end
        return y

    def grouped_experts(
        self, tokens: torch.Tensor, offsets: torch.Tensor, experts: Experts, scale: torch.Tensor
    ) -> torch.Tensor:
        """SwiGLU of tokens [P, dim] sorted by expert, expert e's rows ending at offsets[e] (rows past the last
        offset are left undefined), hidden values times scale [P, 1]."""
        w1, w3, w2 = (experts.dense(name, tokens.dtype, self) for name in ("w1", "w3", "w2"))
        hidden = F.silu(F.grouped_mm(tokens, w1.mT, offs=offsets)).mul_(F.grouped_mm(tokens, w3.mT, offs=offsets))
        return F.grouped_mm(hidden.mul_(scale), w2.mT, offs=offsets)

    def pairs_through_experts(
        self, tokens: torch.Tensor, chosen: torch.Tensor, experts: Experts, scale: torch.Tensor
    ) -> torch.Tensor:
        """SwiGLU of each pair's token [P, dim] through its expert chosen [P] (others' pairs clamped onto the last
        local expert, their results masked by the caller), hidden values times scale [P, 1]: only the chosen
        experts' weights are dequantised."""
        chosen = chosen.clamp(max=experts.count - 1)
        w1, w3, w2 = (experts.dense(name, tokens.dtype, self, chosen) for name in ("w1", "w3", "w2"))
        column = tokens[:, :, None]
        hidden = F.silu(torch.bmm(w1, column)).mul_(torch.bmm(w3, column)).mul_(scale[:, :, None])
        return torch.bmm(w2, hidden)[..., 0]

    # -- attention -------------------------------------------------------------------------------------------------
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
        """Store the step's new cache entries and attend: q [N, H, nope + rope] (not yet rotated), kv [N, C + P]
        (wkv_a's output), index the V3.2 indexer's queries and keys (None without sparse attention); out [N, H, V]."""
        return self.store_and_attend(mla, q, kv, batch, cache, rotations, mla.wkv_b_heads(q.dtype), index)

    def store_and_attend(
        self,
        mla: MLA,
        q: torch.Tensor,
        kv: torch.Tensor,
        batch: ForwardBatch,
        cache: LayerCache,
        rotations,
        wkv_b,
        index: IndexQueries | None = None,
    ) -> torch.Tensor:
        """attention()'s work with wkv_b [H, nope + v, C] given: the new entries stored (the indexer keys after
        attention's own), then each group attended."""
        new = mla.new_entries(q, kv, rotations, wkv_b)
        cache.write(batch.slots, *new.entries, *(() if index is None else (index.key,)))
        outs = [self.attend(mla, new.q, wkv_b, cache, group, index) for group in batch.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend(
        self,
        mla: MLA,
        q: torch.Tensor,
        wkv_b: torch.Tensor,
        cache: LayerCache,
        group: AttentionGroup,
        index: IndexQueries | None = None,
    ) -> torch.Tensor:
        """One group's attention over its rows' blocks (read through the block table, the rows' lengths as the mask,
        narrowed by the indexer's selection where it applies): naive per head; absorbed in latent space, or by
        expanding the latent where that costs fewer FLOPs; out [rows * width, H, V]."""
        q = rows_of(q, group)
        visible = self.selected(mla, cache, group, index)
        causal = group.causal and visible is group.visible
        cached = cache.read(group.block_table, q.dtype, group.first_block, mla.attended)
        if mla.attn_impl == "naive":
            return mla.dense(q, *cached, None if causal else visible).flatten(0, 1)
        if mla.expanding_is_cheaper(group.width, visible.shape[-1]):
            return mla.dense(*mla.expanded(q, wkv_b, *cached), None if causal else visible).flatten(0, 1)
        return mla.absorbed(q, wkv_b, *cached, visible)

    def selected(self, mla: MLA, cache: LayerCache, group: AttentionGroup, index: IndexQueries | None) -> torch.Tensor:
        """The positions each of the group's queries attends to, [rows, width, S]: group.visible itself, or, where
        V3.2's indexer narrows it, the top-k of each query's visible positions by index score over the cached
        indexer keys."""
        if index is None or not mla.narrows(group.visible.shape[-1]):
            return group.visible
        keys = cache.tensors[mla.attended].read(group.block_table, torch.float32, group.first_block)
        return mla.indexer.select(rows_of(index.q, group), rows_of(index.weights, group), keys, group.visible)


def rows_of(x: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """The group's tokens of a stream tensor [N, ...], as [rows, width, ...]."""
    return x[group.start : group.end].view(group.rows, group.width, *x.shape[1:])


@functools.cache
def reference() -> Backend:
    """The one torch backend."""
    return Backend()


# -- block-FP8 products (DeepSeek's recipe: activations per 1x128, weights per 128x128) ----------------------------
def block_fp8_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x times an FP8 weight can run as one block-scaled product: CUDA, sm90 or newer, a torch with
    F.scaled_mm's block-wise recipes that passed its self-check, K a multiple of 128 and x in bf16."""
    if not (
        x.is_cuda and x.dtype == torch.bfloat16 and weight.shape[0] % fp8.BLOCK == weight.shape[1] % fp8.BLOCK == 0
    ):
        return False  # torch's block-wise recipes take whole blocks only (wkv_a's 576 rows stay dequantised)
    return scaled_mm_works(x.device.index or 0)


@functools.cache
def scaled_mm_works(device_index: int) -> bool:
    """Feature detection: the GPU is sm90+, torch has the block-wise recipes, and one product agrees with the
    dequantised one (a torch that lays the scales out otherwise falls back rather than computing wrongly)."""
    recipe = getattr(getattr(F, "ScalingType", None), "BlockWise1x128", None)
    if recipe is None or not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    device = torch.device("cuda", device_index)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(64, 256, device=device, generator=generator).bfloat16()
    weight, scale = fp8.quantize(torch.randn(384, 256, device=device, generator=generator))
    try:
        got = scaled_linear(x, weight, scale)
    except (RuntimeError, TypeError, ValueError):
        return False
    expected = F.linear(x, fp8.dequantize(weight, scale, torch.bfloat16))
    return bool(torch.allclose(got.float(), expected.float(), rtol=0.1, atol=0.1 * expected.abs().mean().item()))


def scaled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16) times an FP8 weight [N, K] with block scales [N / 128, K / 128], on CUDA: x quantised per
    1x128 (or given so, `quantized`: e4m3 values [M, K] and fp32 scales [M, K / 128] column-major, as the cuda
    backend's kernel writes them), one F.scaled_mm with the block-wise recipes, bf16 out."""
    blocks = F.ScalingType
    if quantized is None:
        xq, x_scale = fp8.quantize_rows(x)
        # the recipe's layout of the activations' scales [M, K / 128]: column-major (stride 1 down the rows, whatever
        # M: .t().contiguous().t() keeps a one-row tensor row-major)
        x_scale = x_scale.new_empty(x_scale.shape[::-1]).copy_(x_scale.mT).mT
    else:
        xq, x_scale = quantized
    # the weight's scales [K / 128, N / 128] column-major, K / 128 padded to a multiple of 4 (DeepSeek's widths but a
    # few are that already: no pad then)
    k_blocks = scale.shape[1]
    scale = (F.pad(scale, (0, -k_blocks % 4)) if k_blocks % 4 else scale).t()
    return F.scaled_mm(
        xq,
        weight.t(),
        scale_a=x_scale,
        scale_recipe_a=blocks.BlockWise1x128,
        scale_b=scale,
        scale_recipe_b=blocks.BlockWise128x128,
        output_dtype=x.dtype,
    )
