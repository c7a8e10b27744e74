"""The cuda backend: the torch reference with Triton kernels where torch's own ops are not enough on a GPU
(tp_infer.backends.triton_kernels, imported on first use, so that tp_infer imports where Triton is missing).

- Decode attention (groups of rows with one new token each) runs in one paged MLA decode launch (plus the launch
  that joins the pieces of long histories) reading every row's cache where it lies in the pool: absorb form in latent
  space (the query taken into latent space and the result back out per head by wkv_b, as the reference's
  MLA.absorbed does), naive form per head. Prefill and extend groups keep the reference's SDPA or latent products
  over the gathered blocks: there the gather is one read of the history for many new tokens, which the products
  then reuse.
- V3.2's sparse attention, for decode rows whose view the indexer narrows (more than index_topk positions): their
  index scores over the cached indexer keys in one Triton launch reading the keys in place, written as score keys
  that one torch topk ranks exactly as the torch backend's stable sort (equal scores: the earlier position), then the
  same paged decode kernels over each row's selected positions only, read where they lie. Prefill and extend groups
  the indexer narrows keep the reference's (scores, top-k mask, attention over the gathered blocks).
- Products with FP8 weights use torch's block-scaled F.scaled_mm where the reference's block_fp8_product allows
  (sm90+, bf16, whole 128-blocks), the activations quantised per 1x128 in one launch into the layout it takes, else
  the Triton block-FP8 kernel, which reads the FP8 weight in place (wkv_a's 576 rows, fp32 compute, GPUs before sm90)
  instead of dequantising it into a full-size copy first. In a step of decode rows alone (absorb form) wkv_b too is
  read as FP8 in place, by per-head products around the paged decode.
- Routed experts with FP8 weights run in two Triton launches per layer over the (token, expert) pairs sorted by
  expert on the device (one sort, one search for where each local expert's pairs start; each launch's programs
  work out their own tiles), reading only the chosen experts' FP8 weights.
- The small ops a decode step makes per layer, each one launch where torch takes several (a GPU pays for every
  launch of an eager step): RMSNorm, rope (the query's in place), the router after its fp32 logits
  (tp_infer.backends.triton_router).
- Everything else is the reference's; FP8 operands on GPUs before sm89 (where Triton has no float8_e4m3fn) too.
  A decode step with FP8 weights dequantises nothing.

Every launch is made from shapes alone, nothing read back from the device. Under TRITON_INTERPRET=1 the kernels also
take CPU tensors, which is how the tests run this backend without a GPU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tp_infer.backends.reference import Backend, block_fp8_product, scaled_linear

if TYPE_CHECKING:
    from tp_infer.kv.pool import LayerCache
    from tp_infer.model.attention import MLA, IndexQueries
    from tp_infer.model.batch import AttentionGroup, ForwardBatch
    from tp_infer.model.moe import MLP, Experts, Gate


def triton_kernels():
    """The kernels' module (importing Triton on first use)."""
    from tp_infer.backends import triton_kernels as module

    return module


def triton_router():
    """The router kernel's module (tp_infer.backends.triton_router, importing Triton on first use)."""
    from tp_infer.backends import triton_router as module

    return module


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# paged decode's tiles: heads per program in absorb form (tl.dot's least width); tokens per tile in naive form (32
# spills registers with an FP8 cache)
DECODE_BLOCK_H = 16
PER_HEAD_BLOCK_N = 16


def decode_block_n(latent_dim: int) -> int:
    """Tokens per tile of absorbed decode: 32 at DeepSeek's 512-wide latent (a tile of latents then fits shared
    memory beside the queries), 64 for narrower ones."""
    return 32 if latent_dim > 256 else 64


def decode_split_tokens(rows: int, groups: int, max_tokens: int, multiprocessors: int, block_n: int) -> int:
    """Tokens per piece of history for a paged decode launch of rows x groups programs per piece, from shapes alone
    (nothing read back, so a CUDA graph can hold it): enough pieces that the launch fills the GPU (about two programs
    per multiprocessor), none shorter than 256 tokens; one piece where multiprocessors is 0 (the interpreter)."""
    pieces = 1
    if multiprocessors:
        wanted = -(-2 * multiprocessors // (rows * groups))
        pieces = max(1, min(wanted, -(-max_tokens // 256)))
    tokens = -(-max_tokens // pieces)
    return -(-tokens // block_n) * block_n


class CudaBackend(Backend):
    name = "cuda"

    def prepare(self) -> str:
        triton_kernels()  # imported (and under the interpreter, made to take numpy 2.4) at start-up
        import triton

        where = "Triton's interpreter (TRITON_INTERPRET=1)" if interpreting() else "compiled on first use"
        return (
            f"backend cuda: Triton {triton.__version__} kernels ({where}) for paged MLA decode, block-FP8 "
            "products and FP8 experts; PyTorch's ops for the rest"
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """FP8 weights: torch's block-scaled product where it serves, its activations quantised per 1x128 in one
        launch (quantize_rows), else the Triton kernel reading the weight in place; other weights as the
        reference."""
        if scale is None or not triton_kernels().runs_on(x, fp8=True):
            return super().linear(x, weight, scale)
        if block_fp8_product(x, weight):
            return scaled_linear(x, weight, scale, triton_kernels().quantize_rows(x))
        return triton_kernels().fp8_linear(x, weight, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """One launch where the reference's takes seven (the same rounding: fp32, then x's dtype times the weight)."""
        if not triton_kernels().runs_on(x) or x.stride(-1) != 1:
            return super().rms_norm(x, weight, eps)
        return triton_kernels().rms_norm(x, weight, eps)

    def rope(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        if not self.rope_kernel_takes(x, rotations):
            return super().rope(x, rotations)
        return triton_kernels().rope(x, rotations)

    def rope_(self, x: torch.Tensor, rotations: torch.Tensor) -> None:
        """In place in one launch (the reference rotates a copy, then copies it back)."""
        if not self.rope_kernel_takes(x, rotations):
            return super().rope_(x, rotations)
        triton_kernels().rope(x, rotations, out=x)

    def rope_kernel_takes(self, x: torch.Tensor, rotations: torch.Tensor) -> bool:
        d = x.shape[-1]
        return triton_kernels().runs_on(x) and x.stride(-1) == 1 and rotations.is_contiguous() and d & (d - 1) == 0

    def route(self, x: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's fp32 logits, then everything after them in one Triton launch (tp_infer.backends.triton_router):
        routers it does not take keep the reference's."""
        router = triton_router()
        groups = dict(n_groups=gate.n_groups, topk_groups=gate.topk_groups, topk=gate.topk)
        experts = gate.weight.shape[0]
        if not triton_kernels().runs_on(x) or not router.takes(n_experts=experts, bias=gate.bias is not None, **groups):
            return super().route(x, gate)
        return router.route(
            F.linear(x.float(), gate.weight), gate.bias, sigmoid=gate.score_func == "sigmoid", **groups,
            route_norm=gate.route_norm, route_scale=gate.route_scale, out_dtype=x.dtype,
        )  # fmt: skip

    def experts(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Experts, shared: MLP | None
    ) -> torch.Tensor:
        """FP8 experts in the Triton expert kernels: the (token, choice) pairs sorted by expert on the device (one
        stable sort of the chosen experts' ids), where each local expert's pairs start found by one search of the
        sorted ids, then two launches that schedule their own tiles from those bounds and read only the chosen
        experts' FP8 weights, once per tile of their pairs, with the routing weights applied inside; each token's
        pairs summed. Nothing is read back. Other weights as the reference."""
        if not experts.fp8 or not triton_kernels().runs_on(x, fp8=True):
            return super().experts(x, weights, indices, experts, shared)
        chosen, order = indices.flatten().sort(stable=True)
        first = torch.arange(experts.first, experts.first + experts.count + 1, device=x.device, dtype=chosen.dtype)
        bounds = torch.searchsorted(chosen, first, out_int32=True)  # [E + 1]: where expert e's pairs start, then end
        stacks = (experts.w1, experts.w3, experts.w2)
        scales = (experts.w1_scale, experts.w3_scale, experts.w2_scale)
        out = triton_kernels().fp8_experts(x.contiguous(), order, weights.flatten(), bounds, stacks, scales)
        y = out.sum(dim=1)  # [N, topk, dim]: each token's pairs (zero where another rank's)
        return y if shared is None else y + self.swiglu(x, shared)

    def attention(
        self, mla: MLA, q: torch.Tensor, kv: torch.Tensor, batch: ForwardBatch, cache: LayerCache, rotations, index=None
    ) -> torch.Tensor:
        """A step of decode rows alone in absorb form with an FP8 wkv_b: the new entries stored (V3.2's indexer keys
        after them), then each group's queries taken into latent space and back out by wkv_b read in place as FP8
        (fp8_heads), around the paged decode (over the indexer's selection where it narrows): no dequantised copy of
        wkv_b is made (the reference makes one per layer per step). Otherwise the reference's store, then each group
        here (attend)."""
        if (
            mla.attn_impl != "absorb"
            or mla.wkv_b.scale is None
            or any(group.width != 1 for group in batch.groups)
            or not triton_kernels().runs_on(q, fp8=True)
        ):
            return super().attention(mla, q, kv, batch, cache, rotations, *(() if index is None else (index,)))
        new = mla.new_entries(q, kv, rotations, None)  # absorb form: the entries need no wkv_b
        cache.write(batch.slots, *new.entries, *(() if index is None else (index.key,)))
        latent, rope_key = cache.tensors[:2]
        outs = [
            fp8_absorbed_decode(mla, new.q[g.start : g.end], latent, rope_key, g, *self.selection(mla, cache, g, index))
            for g in batch.groups
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend(
        self, mla: MLA, q: torch.Tensor, wkv_b: torch.Tensor, cache: LayerCache, group: AttentionGroup, index=None
    ) -> torch.Tensor:
        """Decode rows (width 1) in the paged decode kernels over the pool in place, over the positions V3.2's
        indexer selects where it narrows (selection); other groups as the reference."""
        if group.width != 1 or not triton_kernels().runs_on(q, fp8=cache.tensors[0].fp8):
            return super().attend(mla, q, wkv_b, cache, group, *(() if index is None else (index,)))
        rows = q[group.start : group.end]  # [R, H, nope + rope], rotated
        selected, counts = self.selection(mla, cache, group, index)
        if mla.attn_impl == "naive":
            keys, values = cache.tensors[:2]
            return triton_kernels().mha_decode(
                rows, keys.data, keys.scale, values.data, values.scale, group.block_table, counts, mla.softmax_scale,
                selected=selected,
            )  # fmt: skip
        latent, rope_key = cache.tensors[:2]  # the absorb layout's first two quantities (model.attention.cache_layout)
        return absorbed_decode(mla, rows, wkv_b, latent, rope_key, group, selected, counts)

    def selection(
        self, mla: MLA, cache: LayerCache, group: AttentionGroup, index: IndexQueries | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What a decode group's rows attend over, as the paged decode takes it: (None, their lengths) for their whole
        histories; where V3.2's indexer narrows them, each row's top-k positions [R, topk] and how many it selected
        [R] (all it sees while fewer than topk): index scores over the cached indexer keys in place (Triton), as
        score keys, then one topk over them, on the device."""
        if index is None or not mla.narrows(group.visible.shape[-1]):
            return None, group.lengths
        keys = cache.tensors[mla.attended]
        score_keys = triton_kernels().index_scores(
            index.q[group.start : group.end], index.weights[group.start : group.end], keys.data, keys.scale,
            group.block_table, group.lengths,
        )  # fmt: skip
        topk = mla.indexer.topk
        return score_keys.topk(topk, dim=-1, sorted=True).indices, group.lengths.clamp(max=topk)


# the score keys of V3.2's selection on the device: a score's fp32 bits, made order-preserving as a signed integer, in
# the upper 32 bits, the position counted from the end of the row in the lower: one topk over a row's keys (sorted)
# gives its best positions, equal scores the earlier position first, exactly as the torch backend's stable sort
# (Indexer.select) orders them; -0 is made +0 first, as the sort sees them equal. The index score kernel writes them;
# these are the same in torch (tests, and the scores back).
def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """The score keys [R, S] (int64) of scores [R, S] (fp32)."""
    bits = torch.where(scores == 0, 0.0, scores).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return ordered * (1 << 32) + torch.arange(scores.shape[-1] - 1, -1, -1, device=scores.device)


def scores_of(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 scores [R, S] that score keys [R, S] hold."""
    ordered = (keys >> 32).to(torch.int32)
    return torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)


def fp8_absorbed_decode(
    mla: MLA, q: torch.Tensor, latent, rope_key, group: AttentionGroup, selected, counts: torch.Tensor
) -> torch.Tensor:
    """absorbed_decode with wkv_b's FP8 weight and block scales read in place by the per-head products."""
    kernels = triton_kernels()
    q_nope, q_pe = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
    weight, scale = mla.wkv_b.weight, mla.wkv_b.scale
    per_head = mla.nope_dim + mla.v_dim
    q_latent = kernels.fp8_heads(q_nope, weight, scale, mla.kv_lora_rank, per_head, 0, k_along_rows=True)
    mixed = kernels.mla_decode(
        q_latent, q_pe, latent.data, latent.scale, rope_key.data, rope_key.scale, group.block_table, counts,
        mla.softmax_scale, selected=selected,
    )  # fmt: skip
    return kernels.fp8_heads(mixed, weight, scale, mla.v_dim, per_head, mla.nope_dim, k_along_rows=False)


def absorbed_decode(
    mla: MLA, q: torch.Tensor, wkv_b: torch.Tensor, latent, rope_key, group: AttentionGroup, selected, counts
) -> torch.Tensor:
    """Decode rows' queries q [R, H, nope + rope] into latent space by w_k (one batched product over the heads),
    attended over the cached latents and rope keys (CacheTensors) in place, and back out per head by w_v;
    out [R, H, V]. selected and counts: what each row attends over (CudaBackend.selection)."""
    q_nope, q_pe = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
    w_k, w_v = wkv_b[:, : mla.nope_dim], wkv_b[:, mla.nope_dim :]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_k)  # [H, R, C]
    mixed = triton_kernels().mla_decode(
        q_latent.transpose(0, 1), q_pe, latent.data, latent.scale, rope_key.data, rope_key.scale, group.block_table,
        counts, mla.softmax_scale, selected=selected,
    )  # fmt: skip
    return torch.bmm(mixed.transpose(0, 1), w_v.mT).transpose(0, 1)
