"""The router after its logits in one Triton launch (the cuda backend's Gate): scores (softmax or sigmoid), the bias
that steers the choice only, group-limited top-k, the chosen scores gathered, normalised and scaled, for every token
at once; the reference takes about twenty ops for the same (tp_infer.model.moe.Gate.route, the oracle in
tests/test_triton_router.py). The fp32 logits stay torch's (`F.linear(x.float(), gate.weight)`: cuBLAS is the tool
for that product).

One program per token holds the token's experts in registers as [groups, experts per group], each side padded to a
power of two (V3: 8 x 32; V2: 8 x 20 padded to 8 x 32; V2-Lite: 1 x 64). Top-k is k rounds of a maximum and the
lowest index holding it, then that expert masked out; the groups kept are chosen the same way. Nothing is read back
from the device and every shape comes from the arguments, so a CUDA graph can hold the launch.

Ties: where scores are exactly equal, the lowest expert index (or group index) wins, and the chosen experts come in
descending order of their choice score, as torch's topk returns them (torch leaves the order among equal values
unspecified, so only inputs without ties are compared with it exactly). NaN logits give unspecified choices."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import tp_infer.backends.triton_kernels  # noqa: F401  (under TRITON_INTERPRET=1, the interpreter's patches)

MAX_BLOCK = 1024  # a token's experts as laid out in registers (groups x experts per group, each a power of two)
MAX_TOPK = 32  # rounds of selection, unrolled


def unsupported(*, n_experts: int, n_groups: int, topk_groups: int, topk: int, bias: bool) -> str | None:
    """Why the kernel does not take this router (a sentence naming the culprit), or None where it does: the cuda
    backend asks this before building any argument and keeps the reference's route otherwise."""
    if n_groups < 1 or n_experts % n_groups:
        return f"n_groups={n_groups}: must divide n_experts={n_experts}"
    per_group = n_experts // n_groups
    block = triton.next_power_of_2(n_groups) * triton.next_power_of_2(per_group)
    if block > MAX_BLOCK:
        return f"n_experts={n_experts} in {n_groups} groups: more than {MAX_BLOCK} slots once padded"
    if n_groups > 1 and not 1 <= topk_groups <= n_groups:
        return f"topk_groups={topk_groups}: must be in 1..n_groups={n_groups}"
    if n_groups > 1 and bias and per_group < 2:
        return f"n_groups={n_groups}: a biased router scores a group by its best two experts, this one has one"
    eligible = topk_groups * per_group if n_groups > 1 else n_experts
    if not 1 <= topk <= min(eligible, MAX_TOPK):
        return f"topk={topk}: must be in 1..{min(eligible, MAX_TOPK)}"
    return None


def takes(*, n_experts: int, n_groups: int, topk_groups: int, topk: int, bias: bool) -> bool:
    """Whether route() takes this router (unsupported() gives the reason where not)."""
    return unsupported(n_experts=n_experts, n_groups=n_groups, topk_groups=topk_groups, topk=topk, bias=bias) is None


def launch_settings(
    *, n_experts: int, n_groups: int, topk_groups: int, topk: int, sigmoid: bool, bias: bool, route_norm: bool
) -> tuple[dict, int]:
    """The kernel's constexprs and warps for a router (route() launches with them, scripts/compile_kernels.py
    compiles them): the experts as groups x experts per group, each padded to a power of two; one warp up to 256
    slots (every reduction within a warp), up to four for more."""
    block_g, block_p = triton.next_power_of_2(n_groups), triton.next_power_of_2(n_experts // n_groups)
    constexprs = dict(
        BLOCK_G=block_g, BLOCK_P=block_p, BLOCK_K=triton.next_power_of_2(topk), TOPK=topk,
        TOPK_GROUPS=topk_groups if n_groups > 1 else 1, SIGMOID=sigmoid, HAS_BIAS=bias, GROUPED=n_groups > 1,
        NORM=bool(route_norm),
    )  # fmt: skip
    return constexprs, max(1, min(4, block_g * block_p // 256))


@triton.jit
def _route(
    logits, bias, weights, indices, stride_l, stride_w, stride_i, n_groups, per_group, route_scale,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, TOPK: tl.constexpr,
    TOPK_GROUPS: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    NORM: tl.constexpr,
):  # fmt: skip
    """Token n's routing: weights[n, :TOPK] (the chosen scores, normalised where NORM, times route_scale) and
    indices[n, :TOPK], in descending order of choice; equal choices go to the lowest index."""
    n = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    p = tl.arange(0, BLOCK_P)
    expert = g[:, None] * per_group + p[None, :]  # [BLOCK_G, BLOCK_P]; padding may repeat a real index: mask by valid
    valid = (g[:, None] < n_groups) & (p[None, :] < per_group)
    x = tl.load(logits + n * stride_l + expert, mask=valid, other=float("-inf"))  # padding: scores of 0
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias + expert, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUPED:
        # a group scores its best expert, or with a bias its best two summed (the best's lowest index set aside)
        best = tl.max(choice, axis=1)
        group_score = best
        if HAS_BIAS:
            first = tl.min(tl.where(choice == best[:, None], p[None, :], BLOCK_P), axis=1)
            group_score = best + tl.max(tl.where(p[None, :] == first[:, None], float("-inf"), choice), axis=1)
        open_group = g < n_groups
        kept = g < 0
        for _ in tl.static_range(TOPK_GROUPS):
            top = tl.max(tl.where(open_group, group_score, float("-inf")), axis=0)
            pick = tl.min(tl.where(open_group & (group_score == top), g, BLOCK_G), axis=0)
            kept = kept | (g == pick)
            open_group = open_group & (g != pick)
        choice = tl.where(kept[:, None], choice, float("-inf"))
    k = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_K], dtype=tl.int64)
    gathered = tl.zeros([BLOCK_K], dtype=tl.float32)
    free = valid
    for r in tl.static_range(TOPK):
        top = tl.max(tl.max(tl.where(free, choice, float("-inf")), axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(free & (choice == top), expert, BLOCK_G * BLOCK_P), axis=1), axis=0)
        here = valid & (expert == pick)
        score = tl.sum(tl.sum(tl.where(here, scores, 0.0), axis=1), axis=0)
        free = free & ~here
        chosen = tl.where(k == r, pick.to(tl.int64), chosen)
        gathered = tl.where(k == r, score, gathered)
    if NORM:
        gathered = gathered / tl.sum(gathered, axis=0)
    gathered = gathered * route_scale
    tl.store(weights + n * stride_w + k, gathered.to(weights.dtype.element_ty), mask=k < TOPK)
    tl.store(indices + n * stride_i + k, chosen, mask=k < TOPK)


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    sigmoid: bool,
    n_groups: int,
    topk_groups: int,
    topk: int,
    route_norm: bool,
    route_scale: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate.route after its logits [N, E] (fp32, rows contiguous): (weights [N, topk] in out_dtype, indices [N, topk]
    int64), one launch of a program per token. bias [E] (fp32) steers the choice only and makes a group's score its
    best two experts summed. ValueError (the reason from unsupported()) for a router the kernel does not take."""
    tokens, n_experts = logits.shape
    shape = dict(n_experts=n_experts, n_groups=n_groups, topk_groups=topk_groups, topk=topk)
    reason = unsupported(**shape, bias=bias is not None)
    if reason is not None:
        raise ValueError(f"triton router: {reason}")
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"triton router: logits must be fp32, rows contiguous, not {logits.dtype} {logits.stride()}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n_experts,) or bias.stride(0) != 1):
        raise ValueError(f"triton router: bias must be fp32 [{n_experts}], not {bias.dtype} {list(bias.shape)}")
    weights = torch.empty(tokens, topk, dtype=out_dtype, device=logits.device)
    indices = torch.empty(tokens, topk, dtype=torch.int64, device=logits.device)
    if tokens:
        settings, warps = launch_settings(**shape, sigmoid=sigmoid, bias=bias is not None, route_norm=route_norm)
        _route[(tokens,)](
            logits, logits if bias is None else bias, weights, indices, logits.stride(0), weights.stride(0),
            indices.stride(0), n_groups, n_experts // n_groups, float(route_scale), **settings, num_warps=warps,
        )  # fmt: skip
    return weights, indices
