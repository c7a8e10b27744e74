"""The cuda backend's Triton kernels, and the Python that launches them (shapes, strides, grids; nothing is read back
from the device, so every launch can be held in a CUDA graph).

- Paged MLA decode (mla_decode, absorb form; mha_decode, naive form): each row's one new query attends over its
  cached history where it lies in the pool, through the row's block table and length (no gather into a dense
  tensor), the history split into pieces attended in parallel (flash-decoding: each piece's softmax-weighted sum and
  log-sum-exp, then a combine kernel), all rows in one launch. Cache entries are read in their own dtype (bf16, fp16,
  fp32, or float8_e4m3fn with one fp32 scale per token and head: the pool's CacheTensor); an FP8 scale is applied to
  the scores and probabilities rather than to each value (the same numbers, one multiply per token). With
  `selected` (V3.2's sparse attention), each row attends over the positions its indexer selected instead, each read
  where it lies through the block table (no gather), the pieces splitting the selection.
- V3.2's index scores (index_scores): decode rows' scores over their cached indexer keys read in place, fp32
  accumulation, written as order-preserving int64 score keys for one topk on the device.
- Block-FP8 products (fp8_linear): x [M, K] times an FP8 weight [N, K] with one fp32 scale per 128x128 block. Each
  weight tile is read once as FP8, converted exactly (e4m3 fits bf16 and fp32) into the activations' dtype for the
  tensor cores, and its block scale applied to the tile's partial sums: the activations keep their precision (no
  1x128 quantisation), any GPU Triton runs on will do (no FP8 tensor cores needed: this serves where torch's
  block-scaled F.scaled_mm does not, before sm90 and for shapes it refuses), and a decode-sized product, bound by
  reading its weight, reads it once. K and N need not be multiples of 128.
- Routed experts with block-FP8 weights (fp8_experts): gate and up, then down, over the pairs sorted by expert, each
  program working out its own tile from where each expert's pairs start (_tile_of).
- Small fused ops, one launch each: activations quantised per 1x128 for F.scaled_mm (quantize_rows), RMSNorm, rope.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests). The interpreter's tl.dot is wrong on bf16
operands (triton issue 11584), so there every product's operands are upcast to fp32 (UPCAST)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tp_infer.backends.cuda import (
    DECODE_BLOCK_H,
    PER_HEAD_BLOCK_N,
    decode_block_n,
    decode_split_tokens,
    interpreting,
)

FP8_BLOCK = 128  # the weights' scale blocks (tp_infer.model.fp8.BLOCK)


def _interpreter_takes_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar (a one-element array there) into a loop bound with int(array), which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted"): any loop with a bound known at run time fails.
    Fixed upstream after 3.6 (triton issue 9171, pull request 9172) by squeezing the array first; until then the
    same fix is applied here, under the interpreter only."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1, dtype=np.int32))
        return  # an older numpy still converts it
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes", False):
        return  # a Triton laid out otherwise (fixed upstream), or patched already

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch.squeezes = True
    interpreter._patch_lang_tensor = patch


def _interpreter_rounds_to_e4m3_as_gpus_do() -> None:
    """Triton 3.6's interpreter narrows a float to float8_e4m3fn wrongly where rounding carries into the exponent
    (127.9 becomes 64, not 128): its bit arithmetic adds the rounding bit to the mantissa and ORs the overflow into
    the exponent. GPUs round to nearest, ties to even, saturating at 448 (cvt.rn.satfinite), as torch's conversion
    does below 464; so under the interpreter only, narrowing to e4m3 is done by torch, clamped to 448."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    if original is None or getattr(original, "rounds_e4m3", False):
        return
    sources = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}

    def convert(input, input_dtype, output_dtype, rounding_mode):
        source = sources.get(input_dtype)
        if output_dtype != tl.float8e4nv or source is None:
            return original(input, input_dtype, output_dtype, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(input).reshape(-1).view(np.uint8)).view(source)
        out = np.empty(np.shape(input), dtype=np.uint8)  # written through torch, so no tensor is read back
        torch.from_numpy(out).view(-1).copy_(raw.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8))
        return out

    convert.rounds_e4m3 = True
    interpreter._convert_float = convert


if interpreting():
    _interpreter_takes_numpy_2_4()
    _interpreter_rounds_to_e4m3_as_gpus_do()


def runs_on(t: torch.Tensor, fp8: bool = False) -> bool:
    """Whether these kernels take tensors where t lies: CUDA (for FP8 operands a GPU whose Triton converts
    float8_e4m3fn, sm89 and newer), or anywhere under the interpreter."""
    if interpreting():
        return True
    return t.is_cuda and (not fp8 or _capability(t.device.index or 0) >= (8, 9))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for products whose operands come in `dtype`: fp32 operands under the interpreter or when
    the activations are fp32, multiplied in IEEE fp32 (not TF32, so that fp32 agrees with torch's fp32 products)."""
    upcast = interpreting() or dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


@dataclass(frozen=True)
class Tiles:
    """A product kernel's tile (BLOCK_M x BLOCK_N outputs, BLOCK_K deep) and warps, chosen so that ptxas spills no
    register on sm90 (scripts/compile_kernels.py compiles every choice and reports registers and spills)."""

    m: int
    n: int
    k: int
    warps: int

    @property
    def constexprs(self) -> dict[str, int]:
        return dict(BLOCK_M=self.m, BLOCK_N=self.n, BLOCK_K=self.k)


def linear_tiles(rows: int, dtype: torch.dtype) -> Tiles:
    """fp8_linear's: 16 rows deep in K for decode-sized products, 64 x 64 otherwise; fp32 tiles shallower."""
    if dtype == torch.float32:
        return Tiles(16, 64, 32, 4)
    return Tiles(16, 64, 128, 4) if rows <= 16 else Tiles(64, 64, 64, 8)


def expert_block_m(pairs: int, dtype: torch.dtype) -> int:
    """Pairs per tile of the expert kernels (the schedule's and both launches'): 16 for decode-sized steps and fp32."""
    return 16 if pairs <= 256 or dtype == torch.float32 else 64


def expert_tiles_of(pairs: int, dtype: torch.dtype) -> tuple[Tiles, Tiles]:
    """The expert kernels' (gate and up, down) tiles."""
    m = expert_block_m(pairs, dtype)
    if dtype == torch.float32:
        return Tiles(m, 64, 64, 8), Tiles(m, 64, 32, 8)
    return Tiles(m, 64, 64, 8), Tiles(m, 64, 64, 4 if m == 16 else 8)


def heads_tiles(dtype: torch.dtype) -> Tiles:
    """fp8_heads' tiles."""
    return Tiles(16, 64, 32 if dtype == torch.float32 else 64, 8)


COMBINE_BLOCK_S = 16  # pieces of history the combine joins at a time


def index_tiles(dtype: torch.dtype) -> tuple[int, int]:
    """The index scores' (positions per tile, warps): 64 and 8 (32 positions with fp32 queries), so that 64 heads'
    queries of 128 and a tile's products fit registers on sm90 without spilling."""
    return (32 if dtype == torch.float32 else 64), 8


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_tokens_for(rows: int, groups: int, max_tokens: int, device: torch.device, block_n: int) -> int:
    """Tokens per piece of history (cuda.decode_split_tokens) on this device: one piece under the interpreter."""
    multiprocessors = 0 if device.type != "cuda" or interpreting() else _multiprocessors(device.index or 0)
    return decode_split_tokens(rows, groups, max_tokens, multiprocessors, block_n)


# -- paged MLA decode, absorb form -----------------------------------------------------------------------------------
@triton.jit
def _absorbed_split(
    q_latent,
    q_pe,
    latent,
    latent_scale,
    rope,
    rope_scale,
    table,
    lengths,
    selected,
    partial,
    partial_lse,
    sm_scale,
    stride_qlr,
    stride_qlh,
    stride_qpr,
    stride_qph,
    stride_lb,
    stride_lt,
    stride_rb,
    stride_rt,
    stride_lsb,
    stride_rsb,
    stride_tr,
    stride_sr,
    stride_pr,
    stride_ph,
    stride_ps,
    heads,
    latent_dim,
    rope_dim,
    block_size,
    split_tokens,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    FP8: tl.constexpr,
    SELECTED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row, BLOCK_H heads, one piece of its history: the heads' queries in latent space against the piece's
    latents and rope keys read through the block table; writes the piece's normalised weighted sum of latents and its
    log-sum-exp (-inf for a piece past the row's length). SELECTED: the row's history is the positions
    selected[row, :lengths[row]] (V3.2's top-k, any order), each read where it lies through the block table."""
    row = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    piece = tl.program_id(2)
    c = tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    hm, cm, pm = h < heads, c < latent_dim, p < rope_dim
    qlm, qpm = hm[:, None] & cm[None, :], hm[:, None] & pm[None, :]
    ql = tl.load(q_latent + row * stride_qlr + h[:, None] * stride_qlh + c[None, :], mask=qlm, other=0.0)
    qp = tl.load(q_pe + row * stride_qpr + h[:, None] * stride_qph + p[None, :], mask=qpm, other=0.0)
    if UPCAST:
        ql, qp = ql.to(tl.float32), qp.to(tl.float32)
    length = tl.load(lengths + row).to(tl.int32)
    start = piece * split_tokens
    end = tl.minimum(start + split_tokens, length)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < end
        if SELECTED:
            t = tl.load(selected + row * stride_sr + t, mask=tm, other=0).to(tl.int32)
        block = tl.load(table + row * stride_tr + t // block_size, mask=tm, other=0)
        slot = t % block_size
        k = tl.load(
            latent + block[:, None] * stride_lb + slot[:, None] * stride_lt + c[None, :],
            mask=tm[:, None] & cm[None, :],
            other=0.0,
        )
        kp = tl.load(
            rope + block[:, None] * stride_rb + slot[:, None] * stride_rt + p[None, :],
            mask=tm[:, None] & pm[None, :],
            other=0.0,
        )
        k, kp = k.to(ql.dtype), kp.to(ql.dtype)
        scores = tl.dot(ql, tl.trans(k), input_precision=PRECISION)
        rope_scores = tl.dot(qp, tl.trans(kp), input_precision=PRECISION)
        if FP8:
            ks = tl.load(latent_scale + block * stride_lsb + slot, mask=tm, other=0.0)
            ps = tl.load(rope_scale + block * stride_rsb + slot, mask=tm, other=0.0)
            scores = scores * ks[None, :] + rope_scores * ps[None, :]
        else:
            scores = scores + rope_scores
        scores = tl.where(tm[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        if FP8:
            probs = probs * ks[None, :]  # the values' scales, one per token
        acc = acc * alpha[:, None] + tl.dot(probs.to(k.dtype), k, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    base = row * stride_pr + h * stride_ph + piece * stride_ps
    # a piece past the row's length writes its log-sum-exp only, which tells the combine not to read its sums
    tl.store(partial + base[:, None] + c[None, :], out, mask=hm[:, None] & cm[None, :] & (l_i > 0)[:, None])
    tl.store(partial_lse + row * heads * tl.num_programs(2) + h * tl.num_programs(2) + piece, lse, mask=hm)


@triton.jit
def _combine(
    partial,
    partial_lse,
    out,
    stride_pr,
    stride_ph,
    stride_ps,
    stride_or,
    stride_oh,
    heads,
    pieces,
    dim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One row and head: the pieces' weighted sums joined by their log-sum-exps (weights exp(lse - max)), BLOCK_S
    pieces at a time (any number of pieces in bounded registers); the sums of empty pieces (lse -inf), never
    written, are not read."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    lse_at = partial_lse + row * heads * pieces + h * pieces
    top = tl.full([1], float("-inf"), tl.float32)
    for s0 in range(0, pieces, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.max(tl.load(lse_at + s, mask=s < pieces, other=float("-inf")), 0))
    total = tl.zeros([1], tl.float32)
    for s0 in range(0, pieces, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_at + s, mask=s < pieces, other=float("-inf"))
        total += tl.sum(tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0), 0)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < dim
        mixed = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, pieces, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            lse = tl.load(lse_at + s, mask=s < pieces, other=float("-inf"))
            filled = lse > float("-inf")
            weights = tl.where(filled, tl.exp(lse - top), 0.0) / total
            parts = tl.load(
                partial + row * stride_pr + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=filled[:, None] & dm[None, :],
                other=0.0,
            )
            mixed += tl.sum(parts * weights[:, None], 0)
        tl.store(out + row * stride_or + h * stride_oh + d, mixed.to(out.dtype.element_ty), mask=dm)


def _scale_strides(scale: torch.Tensor | None) -> int:
    """The block stride of an FP8 cache's scales [num_blocks, block_size] (their token stride is 1)."""
    if scale is None:
        return 0
    assert scale.stride(1) == 1, "an FP8 cache's scales are contiguous within a block"
    return scale.stride(0)


def _history_span(block_table: torch.Tensor, block_size: int, selected: torch.Tensor | None) -> int:
    """The most positions a row of a decode launch may attend over: its table's, or its selection's width."""
    if selected is None:
        return block_table.shape[1] * block_size
    assert selected.stride(-1) == 1 and selected.shape[0] == block_table.shape[0]
    return selected.shape[1]


@dataclass(frozen=True)
class Pieces:
    """A paged decode launch's split of history: tokens per piece, how many pieces, and the buffers each piece's
    weighted sums partial [R, H, pieces, D] and log-sum-exps lse [R, H, pieces] (fp32) go to, for _combined."""

    split_tokens: int
    count: int
    partial: torch.Tensor
    lse: torch.Tensor


def _pieces(
    q: torch.Tensor,
    groups: int,
    out_dim: int,
    block_table: torch.Tensor,
    block_size: int,
    selected: torch.Tensor | None,
    split_tokens: int | None,
    block_n: int,
) -> Pieces:
    """The pieces a decode launch of q [R, H, ...]'s rows in `groups` programs per row splits each history into
    (split_tokens given, or split_tokens_for this device), with their buffers."""
    rows, heads = q.shape[:2]
    max_tokens = _history_span(block_table, block_size, selected)
    split_tokens = split_tokens or split_tokens_for(rows, groups, max_tokens, q.device, block_n)
    count = -(-max_tokens // split_tokens)
    partial = torch.empty(rows, heads, count, out_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(rows, heads, count, dtype=torch.float32, device=q.device)
    return Pieces(split_tokens=split_tokens, count=count, partial=partial, lse=lse)


def _combined(partial: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The pieces [R, H, S, D] joined by their log-sum-exps [R, H, S]: out [R, H, D] in `dtype`."""
    rows, heads, pieces, dim = partial.shape
    out = torch.empty(rows, heads, dim, dtype=dtype, device=partial.device)
    _combine[(rows, heads)](
        partial,
        lse,
        out,
        *partial.stride()[:3],
        *out.stride()[:2],
        heads,
        pieces,
        dim,
        BLOCK_S=COMBINE_BLOCK_S,
        BLOCK_D=min(128, triton.next_power_of_2(dim)),
    )
    return out


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    latent_scale: torch.Tensor | None,
    rope: torch.Tensor,
    rope_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
    split_tokens: int | None = None,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode over the paged pool in place: each row's queries in latent space q_latent [R, H, C] and
    rope part q_pe [R, H, P] (any strides with the last dimension contiguous, not yet scaled), over the cached latents
    latent [num_blocks, block_size, C] and rope keys rope [num_blocks, block_size, P] (with fp32 scales
    [num_blocks, block_size] each when FP8, else None) of the blocks block_table [R, nb] lists, the first lengths [R]
    positions of each row; out [R, H, C]: each head's softmax-weighted sum of latents, in q_latent's dtype.
    split_tokens: tokens per piece of history (split_tokens_for by default). selected [R, K] (int32 or int64, last
    dimension contiguous): V3.2's sparse decode, each row over the positions selected[r, :lengths[r]] only (its
    indexer's top-k, in any order), read where they lie; the pieces then split the K selected positions."""
    rows, heads, latent_dim = q_latent.shape
    rope_dim = q_pe.shape[-1]
    fp8 = latent_scale is not None
    assert q_latent.stride(-1) == q_pe.stride(-1) == latent.stride(-1) == rope.stride(-1) == 1
    block_h, block_n = DECODE_BLOCK_H, decode_block_n(latent_dim)
    groups = -(-heads // block_h)
    pieces = _pieces(q_latent, groups, latent_dim, block_table, latent.shape[1], selected, split_tokens, block_n)
    upcast, precision = _dot_settings(q_latent.dtype)
    _absorbed_split[(rows, groups, pieces.count)](
        q_latent,
        q_pe,
        latent,
        latent_scale if fp8 else latent,
        rope,
        rope_scale if fp8 else rope,
        block_table,
        lengths,
        block_table if selected is None else selected,
        pieces.partial,
        pieces.lse,
        sm_scale,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        latent.stride(0),
        latent.stride(1),
        rope.stride(0),
        rope.stride(1),
        _scale_strides(latent_scale),
        _scale_strides(rope_scale),
        block_table.stride(0),
        0 if selected is None else selected.stride(0),
        *pieces.partial.stride()[:3],
        heads,
        latent_dim,
        rope_dim,
        latent.shape[1],
        pieces.split_tokens,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_C=triton.next_power_of_2(latent_dim),
        BLOCK_P=max(16, triton.next_power_of_2(rope_dim)),
        FP8=fp8,
        SELECTED=selected is not None,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=8 if latent_dim > 256 else 4,
        num_stages=1 if upcast else 2,  # fp32 tiles of a 512-wide latent: one in shared memory at a time
    )
    return _combined(pieces.partial, pieces.lse, q_latent.dtype)


# -- paged MLA decode, naive form ------------------------------------------------------------------------------------
@triton.jit
def _per_head_split(
    q,
    keys,
    key_scale,
    values,
    value_scale,
    table,
    lengths,
    selected,
    partial,
    partial_lse,
    sm_scale,
    stride_qr,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ksb,
    stride_kst,
    stride_vsb,
    stride_vst,
    stride_tr,
    stride_sr,
    stride_pr,
    stride_ph,
    stride_ps,
    heads,
    key_dim,
    value_dim,
    block_size,
    split_tokens,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
    FP8: tl.constexpr,
    SELECTED: tl.constexpr,
):
    """One row, one head, one piece of its history: the head's query against its own keys and values read through
    the block table (products as sums in fp32: one query row gains nothing from tensor cores); writes the piece's
    normalised weighted sum of values and its log-sum-exp. SELECTED: the history is selected[row, :lengths[row]], as
    in _absorbed_split."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    piece = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    v = tl.arange(0, BLOCK_V)
    dm, vm = d < key_dim, v < value_dim
    query = tl.load(q + row * stride_qr + h * stride_qh + d, mask=dm, other=0.0).to(tl.float32) * sm_scale
    length = tl.load(lengths + row).to(tl.int32)
    start = piece * split_tokens
    end = tl.minimum(start + split_tokens, length)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < end
        if SELECTED:
            t = tl.load(selected + row * stride_sr + t, mask=tm, other=0).to(tl.int32)
        block = tl.load(table + row * stride_tr + t // block_size, mask=tm, other=0)
        slot = t % block_size
        k = tl.load(
            keys + block[:, None] * stride_kb + slot[:, None] * stride_kt + h * stride_kh + d[None, :],
            mask=tm[:, None] & dm[None, :],
            other=0.0,
        ).to(tl.float32)
        val = tl.load(
            values + block[:, None] * stride_vb + slot[:, None] * stride_vt + h * stride_vh + v[None, :],
            mask=tm[:, None] & vm[None, :],
            other=0.0,
        ).to(tl.float32)
        scores = tl.sum(k * query[None, :], 1)
        if FP8:
            scores = scores * tl.load(key_scale + block * stride_ksb + slot * stride_kst + h, mask=tm, other=0.0)
        scores = tl.where(tm, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new)
        l_i = l_i * alpha + tl.sum(probs, 0)
        if FP8:
            probs = probs * tl.load(value_scale + block * stride_vsb + slot * stride_vst + h, mask=tm, other=0.0)
        acc = acc * alpha + tl.sum(probs[:, None] * val, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(partial + row * stride_pr + h * stride_ph + piece * stride_ps + v, out, mask=vm & (l_i > 0))
    tl.store(partial_lse + row * heads * tl.num_programs(2) + h * tl.num_programs(2) + piece + tl.arange(0, 1), lse)


def mha_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_scale: torch.Tensor | None,
    values: torch.Tensor,
    value_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
    split_tokens: int | None = None,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive MLA decode (per-head keys and values) over the paged pool in place: each row's query q [R, H, D] (last
    dimension contiguous, not yet scaled) over the keys [num_blocks, block_size, H, D] and values
    [num_blocks, block_size, H, V] (with fp32 scales [num_blocks, block_size, H] each when FP8, else None) of the
    blocks block_table [R, nb] lists, the first lengths [R] positions of each row; out [R, H, V] in q's dtype.
    selected [R, K]: over the positions selected[r, :lengths[r]] only, as mla_decode."""
    rows, heads, key_dim = q.shape
    value_dim = values.shape[-1]
    fp8 = key_scale is not None
    assert q.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
    pieces = _pieces(q, heads, value_dim, block_table, keys.shape[1], selected, split_tokens, PER_HEAD_BLOCK_N)
    scale_strides = (key_scale.stride()[:2] + value_scale.stride()[:2]) if fp8 else (0, 0, 0, 0)
    _per_head_split[(rows, heads, pieces.count)](
        q,
        keys,
        key_scale if fp8 else keys,
        values,
        value_scale if fp8 else values,
        block_table,
        lengths,
        block_table if selected is None else selected,
        pieces.partial,
        pieces.lse,
        sm_scale,
        q.stride(0),
        q.stride(1),
        *keys.stride()[:3],
        *values.stride()[:3],
        *scale_strides,
        block_table.stride(0),
        0 if selected is None else selected.stride(0),
        *pieces.partial.stride()[:3],
        heads,
        key_dim,
        value_dim,
        keys.shape[1],
        pieces.split_tokens,
        BLOCK_N=PER_HEAD_BLOCK_N,
        BLOCK_D=triton.next_power_of_2(key_dim),
        BLOCK_V=triton.next_power_of_2(value_dim),
        FP8=fp8,
        SELECTED=selected is not None,
    )
    return _combined(pieces.partial, pieces.lse, q.dtype)


# -- V3.2's lightning indexer: decode rows' index scores over the cached indexer keys ------------------------------
@triton.jit
def _index_scores(
    q,
    weights,
    keys,
    key_scale,
    table,
    lengths,
    scores,
    stride_qr,
    stride_qh,
    stride_wr,
    stride_kb,
    stride_kt,
    stride_ksb,
    stride_tr,
    stride_sr,
    heads,
    key_dim,
    block_size,
    positions,
    split_tokens,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row, one piece of its table's positions: the score sum_h weights[h] * relu(q_h . key) of each position
    the row sees (accumulated in fp32, the keys read through the block table with their FP8 scales), -inf for the
    positions past its length, written as its score key (cuda.score_keys: the score's fp32 bits made
    order-preserving, -0 as +0, above the position counted from the end)."""
    row = tl.program_id(0)
    piece = tl.program_id(1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hm, dm = h < heads, d < key_dim
    qm = hm[:, None] & dm[None, :]
    query = tl.load(q + row * stride_qr + h[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    if UPCAST:
        query = query.to(tl.float32)
    w = tl.load(weights + row * stride_wr + h, mask=hm, other=0.0).to(tl.float32)
    length = tl.load(lengths + row).to(tl.int32)
    start = piece * split_tokens
    end = tl.minimum(start + split_tokens, positions)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < tl.minimum(end, length)
        block = tl.load(table + row * stride_tr + t // block_size, mask=tm, other=0)
        slot = t % block_size
        k = tl.load(
            keys + block[:, None] * stride_kb + slot[:, None] * stride_kt + d[None, :],
            mask=tm[:, None] & dm[None, :],
            other=0.0,
        ).to(query.dtype)
        products = tl.dot(query, tl.trans(k), input_precision=PRECISION)  # [heads, positions]
        if FP8:
            products = products * tl.load(key_scale + block * stride_ksb + slot, mask=tm, other=0.0)[None, :]
        score = tl.sum(tl.maximum(products, 0.0) * w[:, None], 0)
        score = tl.where(tm, tl.where(score == 0.0, 0.0, score), float("-inf"))
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        tl.store(scores + row * stride_sr + t, ordered * 4294967296 + (positions - 1 - t), mask=t < end)


def index_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    key_scale: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    split_tokens: int | None = None,
) -> torch.Tensor:
    """V3.2's index scores of decode rows over their cached indexer keys, in place in the pool: queries q [R, Hi, Di]
    (last dimension contiguous) with per-head weights [R, Hi] (fp32, the score scale folded in), over the keys
    [num_blocks, block_size, Di] (FP8 with fp32 scales [num_blocks, block_size], else None) of the blocks
    block_table [R, nb] lists: sum_h weights[h] * relu(q_h . key) in fp32 at each of a row's first lengths[r]
    positions (Indexer.scores), -inf past them, as score keys [R, nb * block_size] (int64, cuda.score_keys: one topk
    over them is the torch backend's stable top-k; cuda.scores_of gives the scores back)."""
    rows, heads, key_dim = q.shape
    fp8 = key_scale is not None
    assert q.stride(-1) == keys.stride(-1) == 1 and weights.stride(-1) == 1
    positions = block_table.shape[1] * keys.shape[1]
    block_n, warps = index_tiles(q.dtype)
    split_tokens = split_tokens or split_tokens_for(rows, 1, positions, q.device, block_n)
    pieces = -(-positions // split_tokens)
    scores = torch.empty(rows, positions, dtype=torch.int64, device=q.device)
    upcast, precision = _dot_settings(q.dtype)
    _index_scores[(rows, pieces)](
        q, weights, keys, key_scale if fp8 else keys, block_table, lengths, scores,
        q.stride(0), q.stride(1), weights.stride(0), keys.stride(0), keys.stride(1), _scale_strides(key_scale),
        block_table.stride(0), scores.stride(0), heads, key_dim, keys.shape[1], positions, split_tokens,
        BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(key_dim)), FP8=fp8, UPCAST=upcast, PRECISION=precision, num_warps=warps,
    )  # fmt: skip
    return scores


# -- block-FP8 products ----------------------------------------------------------------------------------------------
@triton.jit
def _fp8_linear(
    x,
    w,
    scale,
    y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[m, n] = sum over k of x[m, k] * w[n, k] * scale[n // 128, k // 128]: per tile of BLOCK_K (a divisor of 128,
    so one scale per output column), the FP8 weight tile converted to the activations' dtype, one product, its
    partial sums times the column's block scale."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, nm = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(x + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        b = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=nm[None, :] & km[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        s = tl.load(scale + (n // SCALE_BLOCK) * stride_sn + k0 // SCALE_BLOCK, mask=nm, other=0.0)
        acc += tl.dot(a, b.to(a.dtype), input_precision=PRECISION) * s[None, :]
    tl.store(y + m[:, None] * stride_ym + n[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] times an FP8 weight [N, K] (float8_e4m3fn) with fp32 block scales [ceil(N / 128), ceil(K / 128)]
    transposed: [..., N] in x's dtype. Any N and K."""
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(-1) == 1 and scale.stride(-1) == 1 and weight.shape[1] == k
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    tiles = linear_tiles(rows, x.dtype)
    upcast, precision = _dot_settings(x.dtype)
    _fp8_linear[(triton.cdiv(rows, tiles.m), triton.cdiv(n, tiles.n))](
        x2,
        weight,
        scale,
        y,
        rows,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        scale.stride(0),
        y.stride(0),
        **tiles.constexprs,
        SCALE_BLOCK=FP8_BLOCK,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=tiles.warps,
    )
    return y.view(*lead, n)


# -- routed experts with block-FP8 weights ---------------------------------------------------------------------------
@triton.jit
def _tile_of(bounds, count, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's tile of an expert launch, from bounds [count + 1] (local expert e's pairs, sorted by expert,
    are [bounds[e], bounds[e + 1])): expert e gets ceil(pairs / BLOCK_M) tiles, in expert order, the launch's
    remaining tiles are spare. (expert or -1, start, end) of the tile's pairs; computed in registers by every
    program, so no schedule is built or read back beforehand."""
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    em = e < count
    starts = tl.load(bounds + e, mask=em, other=0)
    ends = tl.load(bounds + e + 1, mask=em, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((em & (tile_end <= t)).to(tl.int32), axis=0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=0)
    start = tl.sum(tl.where(mine, starts, 0), axis=0) + (t - first_tile) * BLOCK_M
    end = tl.minimum(start + BLOCK_M, tl.sum(tl.where(mine, ends, 0), axis=0))
    spare = expert >= count
    return tl.where(spare, -1, expert), tl.where(spare, 0, start), tl.where(spare, 0, end)


@triton.jit
def _tile_schedule(bounds, count, expert_out, start_out, end_out, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each tile's _tile_of written out (tile_schedule)."""
    expert, start, end = _tile_of(bounds, count, BLOCK_M, BLOCK_E)
    t = tl.program_id(0)
    tl.store(expert_out + t, expert)
    tl.store(start_out + t, start)
    tl.store(end_out + t, end)


def expert_tile_count(pairs: int, experts: int, block_m: int) -> int:
    """The tiles an expert launch has: as many as any routing of `pairs` pairs over `experts` experts can need
    (pairs / block_m + experts, a number known on the host)."""
    return -(-pairs // block_m) + experts


def tile_schedule(bounds: torch.Tensor, pairs: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schedule the expert kernels compute for themselves (_tile_of), written out: per tile its expert (-1 for a
    spare tile, which does nothing: experts without pairs get no tile) and its pairs [start, end)."""
    count = bounds.shape[0] - 1
    tiles = expert_tile_count(pairs, count, block_m)
    expert, start, end = (torch.empty(tiles, dtype=torch.int64, device=bounds.device) for _ in range(3))
    _tile_schedule[(tiles,)](
        bounds, count, expert, start, end, BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(max(count, 2))
    )
    return expert, start, end


@triton.jit
def _experts_up(
    x,
    order,
    pair_weights,
    bounds,
    w1,
    s1,
    w3,
    s3,
    hidden,
    count,
    topk,
    dim,
    inter,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of up to BLOCK_M (token, choice) pairs of one expert, sorted by expert (_tile_of), and BLOCK_N hidden
    columns: silu(x w1^T) * (x w3^T) times each pair's routing weight, the FP8 weight tiles read once with their
    block scales (as _fp8_linear), the tokens gathered by index (pair order[r] is token order[r] // topk's choice).
    A spare tile reads nothing: its loop runs no iteration."""
    expert, start, end = _tile_of(bounds, count, BLOCK_M, BLOCK_E)
    r = start + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, nm = r < end, n < inter
    pair = tl.load(order + r, mask=rm, other=0)
    token = pair // topk
    e = tl.maximum(expert, 0)
    k_end = tl.where(expert >= 0, dim, 0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < dim
        a = tl.load(x + token[:, None] * stride_xm + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        weight_at = e * stride_we + n[None, :] * stride_wn + k[:, None]
        wmask = nm[None, :] & km[:, None]
        scale_at = e * stride_se + (n // SCALE_BLOCK) * stride_sn + k0 // SCALE_BLOCK
        b1 = tl.load(w1 + weight_at, mask=wmask, other=0.0).to(a.dtype)
        b3 = tl.load(w3 + weight_at, mask=wmask, other=0.0).to(a.dtype)
        acc1 += tl.dot(a, b1, input_precision=PRECISION) * tl.load(s1 + scale_at, mask=nm, other=0.0)[None, :]
        acc3 += tl.dot(a, b3, input_precision=PRECISION) * tl.load(s3 + scale_at, mask=nm, other=0.0)[None, :]
    routing = tl.load(pair_weights + pair, mask=rm, other=0.0).to(tl.float32)
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3 * routing[:, None]
    tl.store(
        hidden + r[:, None] * stride_hm + n[None, :], h.to(hidden.dtype.element_ty), mask=rm[:, None] & nm[None, :]
    )


@triton.jit
def _experts_down(
    hidden,
    order,
    bounds,
    w2,
    s2,
    out,
    count,
    inter,
    dim,
    stride_hm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of sorted pairs' hidden values times their expert's w2 (FP8, block scales), each pair's row written
    where the pair stands unsorted (order[r]); a spare tile writes nothing."""
    expert, start, end = _tile_of(bounds, count, BLOCK_M, BLOCK_E)
    r = start + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, nm = r < end, n < dim
    pair = tl.load(order + r, mask=rm, other=0)
    e = tl.maximum(expert, 0)
    k_end = tl.where(expert >= 0, inter, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < inter
        a = tl.load(hidden + r[:, None] * stride_hm + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        b = tl.load(w2 + e * stride_we + n[None, :] * stride_wn + k[:, None], mask=nm[None, :] & km[:, None], other=0.0)
        s = tl.load(s2 + e * stride_se + (n // SCALE_BLOCK) * stride_sn + k0 // SCALE_BLOCK, mask=nm, other=0.0)
        acc += tl.dot(a, b.to(a.dtype), input_precision=PRECISION) * s[None, :]
    tl.store(out + pair[:, None] * stride_om + n[None, :], acc.to(out.dtype.element_ty), mask=rm[:, None] & nm[None, :])


def fp8_experts(
    x: torch.Tensor,
    order: torch.Tensor,
    pair_weights: torch.Tensor,
    bounds: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    scales: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Routed experts with block-FP8 weights over the (token, choice) pairs of x [N, dim]'s tokens, N * topk of them
    (pair p is token p // topk's choice, with routing weight pair_weights [P][p]): order [P] lists the pairs sorted
    by expert, local expert e's pairs at sorted positions [bounds[e], bounds[e + 1]) (bounds [E + 1], int32); pairs
    outside [bounds[0], bounds[E]) (other ranks' experts) are left out. weights (w1, w3, w2) stacked [E, inter, dim],
    [E, inter, dim], [E, dim, inter] in float8_e4m3fn with scales [E, ceil(rows / 128), ceil(cols / 128)]. Two
    launches (gate and up with SwiGLU and the routing weight; down), each scheduling its own tiles from bounds and
    reading only the experts that have pairs, once per tile of pairs; out [N, topk, dim] in x's dtype: each pair's
    output where it stands, zero for the pairs left out."""
    w1, w3, w2 = weights
    s1, s3, s2 = scales
    pairs, dim, inter, count = order.shape[0], x.shape[1], w1.shape[1], bounds.shape[0] - 1
    topk = pairs // x.shape[0] if x.shape[0] else 1
    assert w1.stride() == w3.stride() and s1.stride() == s3.stride() and x.stride(-1) == 1
    up, down = expert_tiles_of(pairs, x.dtype)
    tiles = expert_tile_count(pairs, count, up.m)
    upcast, precision = _dot_settings(x.dtype)
    settings = dict(
        BLOCK_E=triton.next_power_of_2(max(count, 2)), SCALE_BLOCK=FP8_BLOCK, UPCAST=upcast, PRECISION=precision
    )
    hidden = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _experts_up[(tiles, triton.cdiv(inter, up.n))](
        x, order, pair_weights, bounds, w1, s1, w3, s3, hidden, count, topk, dim, inter,
        x.stride(0), w1.stride(0), w1.stride(1), s1.stride(0), s1.stride(1), hidden.stride(0),
        **up.constexprs, **settings, num_warps=up.warps,
    )  # fmt: skip
    out = torch.zeros(x.shape[0], topk, dim, dtype=x.dtype, device=x.device)
    _experts_down[(tiles, triton.cdiv(dim, down.n))](
        hidden, order, bounds, w2, s2, out, count, inter, dim,
        hidden.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), dim,
        **down.constexprs, **settings, num_warps=down.warps,
    )  # fmt: skip
    return out


# -- per-head products with a block-FP8 weight (MLA's wkv_b in absorb form) ------------------------------------------
@triton.jit
def _fp8_heads(
    x,
    w,
    scale,
    y,
    M,
    N,
    K,
    rows_per_head,
    first_row,
    stride_xh,
    stride_xm,
    stride_yh,
    stride_ym,
    stride_w,
    stride_s,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    K_ALONG_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Head h's y[h, m, n] = sum over k of x[h, m, k] * W_h[n, k], where W_h is a window of the FP8 weight w: rows
    h * rows_per_head + first_row + (k if K_ALONG_ROWS else n), column (n if K_ALONG_ROWS else k). Each weight tile
    is read once and dequantised in registers by its elements' block scales (a head's window need not start on a
    128-row block), then multiplied in the activations' dtype."""
    h = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, nm = m < M, n < N
    base = h * rows_per_head + first_row
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(x + h * stride_xh + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        if K_ALONG_ROWS:
            rows, cols = base + k[:, None], n[None, :]
        else:
            rows, cols = base + n[None, :], k[:, None]
        wm = km[:, None] & nm[None, :]
        tile = tl.load(w + rows * stride_w + cols, mask=wm, other=0.0).to(tl.float32)
        tile *= tl.load(scale + (rows // SCALE_BLOCK) * stride_s + cols // SCALE_BLOCK, mask=wm, other=0.0)
        acc += tl.dot(a, tile.to(a.dtype), input_precision=PRECISION)
    out = y + h * stride_yh + m[:, None] * stride_ym + n[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def fp8_heads(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    rows_per_head: int,
    first_row: int,
    k_along_rows: bool,
) -> torch.Tensor:
    """Per-head products of x [R, H, K] (last dimension contiguous) with windows of one FP8 weight [H *
    rows_per_head, C] and its 128x128 block scales, read in place: head h's window is rows h * rows_per_head +
    first_row on. k_along_rows: the window's K rows by out_features columns, out[r, h] = x[r, h] @ W_h (MLA's w_k,
    taking a query into latent space); else its out_features rows by K columns, out[r, h] = x[r, h] @ W_h^T (w_v,
    taking latents back out). out [R, H, out_features] in x's dtype."""
    rows, heads, k = x.shape
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and scale.stride(-1) == 1
    y = torch.empty(rows, heads, out_features, dtype=x.dtype, device=x.device)
    tiles = heads_tiles(x.dtype)
    upcast, precision = _dot_settings(x.dtype)
    _fp8_heads[(triton.cdiv(rows, tiles.m), triton.cdiv(out_features, tiles.n), heads)](
        x, weight, scale, y, rows, out_features, k, rows_per_head, first_row, x.stride(1), x.stride(0),
        y.stride(1), y.stride(0), weight.stride(0), scale.stride(0),
        **tiles.constexprs, SCALE_BLOCK=FP8_BLOCK, K_ALONG_ROWS=k_along_rows, UPCAST=upcast, PRECISION=precision,
        num_warps=tiles.warps,
    )  # fmt: skip
    return y


# -- small fused ops: one launch each where torch takes several ----------------------------------------------------
@triton.jit
def _quantize_rows(x, q, scale, stride_xm, stride_qm, stride_sm, stride_sk, BLOCK: tl.constexpr):
    """One 1 x BLOCK block of row m: its absolute maximum over the largest e4m3 value (at least 1e-12 / 448) as the
    block's fp32 scale, the values divided by it and rounded to e4m3 (nearest, ties to even)."""
    m, b = tl.program_id(0), tl.program_id(1)
    k = b * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(x + m * stride_xm + k).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(values), axis=0), 1e-12) / 448.0
    tl.store(q + m * stride_qm + k, (values / s).to(q.dtype.element_ty))
    tl.store(scale + m * stride_sm + b * stride_sk, s)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] (K a multiple of 128, the last dimension contiguous) quantised per 1x128 block as
    tp_infer.model.fp8.quantize_rows does (the same values and scales), in one launch: (e4m3 values [M, K], fp32
    scales [M, K / 128]), the scales laid out column-major as F.scaled_mm's BlockWise1x128 recipe takes them."""
    rows, k = x.shape
    assert k % FP8_BLOCK == 0 and x.stride(-1) == 1
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty_strided((rows, k // FP8_BLOCK), (1, rows), dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows[(rows, k // FP8_BLOCK)](
            x, q, scale, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1), BLOCK=FP8_BLOCK
        )
    return q, scale


@triton.jit
def _rms_norm(x, weight, y, D, eps, stride_xm, stride_ym, BLOCK_D: tl.constexpr, FP32: tl.constexpr):
    """Row m of y: x over the root of its mean square plus eps, in fp32; fp32 rows times the weight there, others
    rounded to their dtype first and multiplied by the weight in it (as the torch backend rounds)."""
    m = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    values = tl.load(x + m * stride_xm + d, mask=dm, other=0.0).to(tl.float32)
    normed = values * tl.rsqrt(tl.sum(values * values, axis=0) / D + eps)
    w = tl.load(weight + d, mask=dm, other=0.0)
    if FP32:  # noqa: SIM108 (a branch the compiler takes or drops, by the constexpr)
        out = normed * w
    else:
        out = normed.to(w.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(y + m * stride_ym + d, out.to(y.dtype.element_ty), mask=dm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch backend's rms_norm of x [..., D] (the last dimension contiguous) with weight [D] in x's dtype, one
    launch, a program per row."""
    d = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, d)
    assert x2.stride(-1) == 1 and weight.stride(-1) == 1
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm[(x2.shape[0],)](
            x2, weight, y, d, eps, x2.stride(0), d,
            BLOCK_D=triton.next_power_of_2(d), FP32=x.dtype == torch.float32, num_warps=8 if d > 2048 else 4,
        )  # fmt: skip
    return y


@triton.jit
def _rope(x, rotations, y, H, stride_xn, stride_xh, stride_yn, stride_yh, BLOCK_H: tl.constexpr, PAIRS: tl.constexpr):
    """Token n's heads: each pair (even, odd) becomes (even cos - odd sin, even sin + odd cos) in fp32, with token n's
    (cos, sin) per pair; y may be x (each program reads its pairs before writing them)."""
    n = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, PAIRS)
    hm = (h < H)[:, None]
    at = x + n * stride_xn + h[:, None] * stride_xh + 2 * i[None, :]
    even = tl.load(at, mask=hm, other=0.0).to(tl.float32)
    odd = tl.load(at + 1, mask=hm, other=0.0).to(tl.float32)
    cos = tl.load(rotations + n * 2 * PAIRS + 2 * i)[None, :]
    sin = tl.load(rotations + n * 2 * PAIRS + 2 * i + 1)[None, :]
    out = y + n * stride_yn + h[:, None] * stride_yh + 2 * i[None, :]
    tl.store(out, (even * cos - odd * sin).to(y.dtype.element_ty), mask=hm)
    tl.store(out + 1, (even * sin + odd * cos).to(y.dtype.element_ty), mask=hm)


def rope(x: torch.Tensor, rotations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H, D] or [N, D] (the last dimension contiguous, D even and a power of two) rotated pairwise by rotations
    [N, D / 2, 2] (cos, sin; fp32, contiguous) as tp_infer.model.rope.apply_rope does, one launch: into `out` (of
    x's shape; x itself rotates in place), else a new tensor."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    tokens, d = x.shape[0], x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    head_strides = (x.stride(1), y.stride(1)) if x.dim() == 3 else (0, 0)  # [N, D]: one head
    assert x.stride(-1) == 1 and y.stride(-1) == 1 and y.shape == x.shape and rotations.is_contiguous()
    assert d == 2 * rotations.shape[1] and d & (d - 1) == 0, "rope dims: a power of two, twice the rotations' pairs"
    block_h = min(16, triton.next_power_of_2(heads))
    if tokens:
        _rope[(tokens, triton.cdiv(heads, block_h))](
            x, rotations, y, heads, x.stride(0), head_strides[0], y.stride(0), head_strides[1],
            BLOCK_H=block_h, PAIRS=d // 2,
        )  # fmt: skip
    return y
