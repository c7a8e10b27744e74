"""Compiled CPU kernels for what PyTorch runs slowly at decode and in short extends (kernels.c). Such a step is a few
rows of activations through many small layers, where each PyTorch op costs tens of microseconds of dispatch with the
caches cold and MKL reads a thin product's weight on one core at a third of the memory bandwidth. So each layer's work
is one call here: a few rows times a weight matrix; a SwiGLU; an RMSNorm; a rotary embedding; MoE's router and its
experts; MLA's decode over the paged cache in place, storing the step's new entries on the way; and the attention of
a row's new tokens over its positions (extend_attention), for prefills too.

Built on first use with the system's C compiler into a per-user cache (about 5 s here, once per source and machine;
later processes load it in under a millisecond). Where there is no compiler or no AVX2, or when switched off
(--no-cpu-kernels), PyTorch does the work; the two agree to fp32 rounding, not bit for bit (they sum in different
orders).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tp_infer.private_files import UnsafePathError, check_private_file, ensure_private_dir

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# added where PyTorch finds AVX-512 (ATEN_CPU_CAPABILITY=avx2 says otherwise): the products' tiles then use its 32
# registers of 16 floats
AVX512_FLAGS = ["-mavx512f"]
LIBS = ["-lm"]
# rows up to which the row kernels take the work (products, SwiGLU, norms, rotary embedding, MoE's router and experts
# in one call). Single products with the weights cold against oneDNN's, at the bench model's shapes here (AVX-512):
# 1.5-2.3x faster at 8 rows, 1.1-2.0x at 16, 0.9-1.6x at 24, 0.8-1.2x at 64; in the model they win at 64 too, where
# a short extend's rows change every turn and oneDNN builds a product for each new count: config_bench's 63-token
# extend took 100 -> 85 ms (naive) and 131 -> 118 ms (absorbed) with 64 here instead of 24, and each expert's share
# of the tokens goes through the compiled MoE, not a Python loop over experts
MAX_ROWS = 64

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use the compiled kernels where they apply (the default) or always PyTorch's."""
    global _enabled
    _enabled = enabled


def cache_dir() -> Path:
    """Where the built kernels are kept: the user's cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tp_infer"


def flags() -> list[str]:
    """The compiler's flags for this CPU, as PyTorch sees it."""
    return FLAGS + (AVX512_FLAGS if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])


def build(compiler: str, path: Path) -> None:
    """Compile kernels.c to path: beside it under a temporary name, then renamed, as ranks and test processes may
    build at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *flags(), str(SOURCE), "-o", partial, *LIBS]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels of this process, built if needed; None where they cannot be (no C compiler, no AVX2)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *flags(), *LIBS, platform.machine()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{tag}.so"
    try:
        # a library is code this process runs: only from a folder no one else can write, a file of this user's
        ensure_private_dir(path.parent)
        if not path.exists():
            build(compiler, path)
        check_private_file(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:  # UnsafePathError is a ValueError: below
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"tp_infer: CPU kernels not built ({detail}); using PyTorch's", stacklevel=2)
        return None
    except UnsafePathError as e:
        warnings.warn(f"tp_infer: CPU kernels not loaded: {e}; using PyTorch's", stacklevel=2)
        return None
    lib.small_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.small_matmul.restype = ctypes.c_int
    lib.mla_decode.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.c_int]
    lib.mla_decode.restype = ctypes.c_int
    lib.mha_decode.argtypes = lib.mla_decode.argtypes
    lib.mha_decode.restype = ctypes.c_int
    lib.swiglu.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.swiglu.restype = ctypes.c_int
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float]
    lib.rms_norm.restype = None
    lib.rope.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    lib.rope.restype = None
    lib.route.argtypes = [ctypes.POINTER(RouteArgs), ctypes.c_int]
    lib.route.restype = ctypes.c_int
    lib.moe.argtypes = [ctypes.POINTER(MoeArgs), ctypes.c_int]
    lib.moe.restype = ctypes.c_int
    lib.extend_attention.argtypes = [ctypes.POINTER(ExtendArgs), ctypes.c_int]
    lib.extend_attention.restype = ctypes.c_int
    lib.index_topk.argtypes = [ctypes.POINTER(IndexTopkArgs), ctypes.c_int]
    lib.index_topk.restype = ctypes.c_int
    return lib


def onednn_for(*tensors: torch.Tensor) -> bool:
    """Whether products of these operands go through oneDNN (see linear): switched on, all fp32 on the CPU."""
    return _enabled and all(t.dtype == torch.float32 and t.is_cpu for t in tensors) and onednn_products()


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [M, K] times weight [N, K] transposed goes through oneDNN: onednn_for both, the weight contiguous or
    the transpose of a contiguous matrix (other strides take a path thousands of times slower)."""
    layout = x.dim() == weight.dim() == 2 and (weight.is_contiguous() or weight.t().is_contiguous())
    return layout and onednn_for(x, weight)


def usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, where they apply to these operands: switched on, all fp32 on the CPU, the library built."""
    if not (_enabled and all(t.dtype == torch.float32 and t.is_cpu for t in tensors)):
        return None
    return library()


def rows_fit(x: torch.Tensor) -> bool:
    """Whether the row kernels take x: 1 to MAX_ROWS fp32 rows on the CPU, the kernels built and switched on. Asked
    before any operand (a dequantised weight) is built for them."""
    return few_rows(x) and usable(x) is not None


def few_rows(x: torch.Tensor) -> bool:
    """Whether x is [M, K] with 1 to MAX_ROWS rows: what the row kernels take."""
    return x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS


@functools.cache
def onednn_products() -> bool:
    """Whether this PyTorch has oneDNN's product (x86 builds) and it agrees with F.linear on a small case."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    x, weight = torch.linspace(-1, 1, 48).view(3, 16), torch.linspace(1, -1, 80).view(5, 16)
    try:
        return torch.allclose(op(x, weight, None, "none", [], ""), F.linear(x, weight), atol=1e-5)
    except RuntimeError:
        return False


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] times weight [N, K] transposed: the compiled product for 1 to MAX_ROWS fp32 rows on the CPU, other
    fp32 products on the CPU through oneDNN, else F.linear."""
    lib = usable(x, weight) if few_rows(x) and weight.is_contiguous() else None
    if lib is None:
        if onednn_applies(x, weight):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
        return F.linear(x, weight)
    x = x.contiguous()
    y = x.new_empty(x.shape[0], weight.shape[0])
    lib.small_matmul(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], *weight.shape, torch.get_num_threads())
    return y


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """(silu(x w1^T) * x w3^T) w2^T for x [M, dim] with 1 to MAX_ROWS fp32 rows on the CPU, in one compiled call
    instead of five ops; None elsewhere (the caller runs PyTorch's)."""
    fits = few_rows(x) and all(w.is_contiguous() for w in (w1, w3, w2))
    lib = usable(x, w1, w3, w2) if fits else None
    if lib is None:
        return None
    x = x.contiguous()
    (rows, dim), inter = x.shape, w1.shape[0]
    y = x.new_empty(rows, w2.shape[0])
    pointers = (t.data_ptr() for t in (x, w1, w3, w2, y))
    status = lib.swiglu(*pointers, rows, inter, dim, torch.get_num_threads())
    assert status == 0, f"swiglu: out of memory for {rows} x {inter} hidden values"
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [M, N] (rows may be strided) for 1 to MAX_ROWS fp32 rows on the CPU, compiled: a few
    microseconds where PyTorch's composite takes tens; None elsewhere."""
    lib = usable(x, weight) if few_rows(x) and x.stride(-1) == 1 else None
    if lib is None:
        return None
    y = x.new_empty(x.shape)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), *x.shape, x.stride(0), eps)
    return y


class RouteArgs(ctypes.Structure):
    """route's operands (kernels.c's Route): pointers, sizes, then the rules."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "gate", "bias", "weights", "indices")]
    _fields_ += [(name, ctypes.c_int64) for name in ("m", "dim", "E", "groups", "topk_groups", "topk")]
    _fields_ += [("sigmoid", ctypes.c_int), ("norm", ctypes.c_int), ("scale", ctypes.c_float)]


def route(
    x: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None,
    sigmoid: bool,
    groups: int,
    topk_groups: int,
    topk: int,
    norm: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MoE routing of x [M, dim] by gate [E, dim] (Gate.forward's rules) for 1 to MAX_ROWS fp32 rows on the CPU, in
    one call: the weights [M, topk] and expert indices [M, topk]; None elsewhere."""
    operands = (x, gate) if bias is None else (x, gate, bias)
    lib = usable(*operands) if few_rows(x) and all(t.is_contiguous() for t in operands) else None
    if lib is None:
        return None
    weights, indices = x.new_empty(x.shape[0], topk), torch.empty(x.shape[0], topk, dtype=torch.int64)
    args = RouteArgs(
        x=x.data_ptr(), gate=gate.data_ptr(), bias=None if bias is None else bias.data_ptr(),
        weights=weights.data_ptr(), indices=indices.data_ptr(), m=x.shape[0], dim=x.shape[1], E=gate.shape[0],
        groups=groups, topk_groups=topk_groups, topk=topk, sigmoid=sigmoid, norm=norm, scale=scale,
    )  # fmt: skip
    status = lib.route(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"route: out of memory for {x.shape[0]} x {gate.shape[0]} scores"
    return weights, indices


class MoeArgs(ctypes.Structure):
    """moe's operands (kernels.c's Moe): pointers (the chosen experts' ids and weight arrays), then sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "weights", "indices", "ids", "w1s", "w3s", "w2s")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("sw1", "sw3", "sw2", "y")]
    _fields_ += [(name, ctypes.c_int64) for name in ("n", "m", "topk", "dim", "inter", "shared_inter")]


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor | None:
    """This rank's mixture of experts for x [M, dim], 1 to MAX_ROWS fp32 rows on the CPU, in one call: the shared
    expert's (w1, w3, w2) on every token, plus each of `experts` (id -> weights: the local experts some token chose)
    on the tokens routed to it, times their weight, expert by expert in ascending order as MoE adds them; None
    elsewhere."""
    ids = sorted(experts)
    matrices = [w for e in ids for w in experts[e]] + list(shared or ())
    lib = usable(x, weights, *matrices) if few_rows(x) and all(w.is_contiguous() for w in matrices) else None
    if lib is None or indices.dtype != torch.int64:
        return None
    x, weights, indices = x.contiguous(), weights.contiguous(), indices.contiguous()
    per_expert = [(ctypes.c_void_p * len(ids))(*(experts[e][i].data_ptr() for e in ids)) for i in range(3)]
    (rows, dim), topk = x.shape, weights.shape[1]
    inter, shared_inter = experts[ids[0]][0].shape[0] if ids else 0, 0 if shared is None else shared[0].shape[0]
    y = torch.empty_like(x)
    chosen = (ctypes.c_int64 * len(ids))(*ids)
    sw1, sw3, sw2 = (None, None, None) if shared is None else tuple(w.data_ptr() for w in shared)
    args = MoeArgs(
        x=x.data_ptr(), weights=weights.data_ptr(), indices=indices.data_ptr(), ids=ctypes.addressof(chosen),
        w1s=ctypes.addressof(per_expert[0]), w3s=ctypes.addressof(per_expert[1]), w2s=ctypes.addressof(per_expert[2]),
        sw1=sw1, sw3=sw3, sw2=sw2, y=y.data_ptr(), n=len(ids), m=rows, topk=topk, dim=dim, inter=inter,
        shared_inter=shared_inter,
    )  # fmt: skip
    status = lib.moe(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"moe: out of memory for {rows} tokens"
    return y


def rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor | None:
    """x [M, H, D] or [M, D] (last dimension contiguous) rotated pairwise by rotations [M, D / 2] complex64, for 1 to
    MAX_ROWS fp32 rows on the CPU: one call where PyTorch's complex product takes five; None elsewhere."""
    fits = x.dim() in (2, 3) and 0 < x.shape[0] <= MAX_ROWS and x.stride(-1) == 1 and rotations.dtype == torch.complex64
    lib = usable(x) if fits and rotations.is_cpu and rotations.is_contiguous() else None
    if lib is None:
        return None
    heads, head_stride = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    y = x.new_empty(x.shape)
    lib.rope(
        x.data_ptr(), rotations.data_ptr(), y.data_ptr(), x.shape[0], heads, x.shape[-1] // 2, x.stride(0), head_stride
    )
    return y


class ExtendArgs(ctypes.Structure):
    """extend_attention's operands (kernels.c's Extend): pointers, then strides in floats, then sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("q1", "q2", "k1", "k2", "v", "out")]
    _fields_ += [(name, ctypes.c_int64) for name in ("q1_ts", "q1_hs", "q2_ts", "q2_hs", "k1_ss", "k1_hs")]
    _fields_ += [(name, ctypes.c_int64) for name in ("k2_ss", "k2_hs", "v_ss", "v_hs", "o_ts", "o_hs")]
    _fields_ += [(name, ctypes.c_int64) for name in ("T", "H", "G", "D1", "D2", "Dv", "first")]
    _fields_ += [("scale", ctypes.c_float)]


def extend_attention(
    queries: tuple[torch.Tensor, ...],
    keys: tuple[torch.Tensor, ...],
    values: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> bool:
    """Attention of one row's T new tokens over its S positions, causal among the new ones (token t sees positions
    0 .. S - T + t), into out [T, H, Dv]: queries (q1,) or (q1, q2) [T, H, D1 | D2] against keys (k1,) or (k1, k2)
    [S, G, D1 | D2] (scores summed over both parts), values [S, G, Dv]; head h reads kv head h / (H / G). Every tensor
    may be strided but its last dimension; dimensions multiples of 16. Computed where they lie, in tiles (kernels.c),
    and True; False where the kernel does not apply (not fp32 on the CPU, other shapes, switched off, not built)."""
    tensors = (*queries, *keys, values, out)
    (T, H, _), (S, G, _) = queries[0].shape, keys[0].shape
    fits = all(t.dim() == 3 and t.stride(-1) == 1 and t.shape[-1] % 16 == 0 for t in tensors) and len(queries) == len(
        keys
    )
    fits = fits and S >= T and H % G == 0 and values.shape[:2] == (S, G) and out.shape[:2] == (T, H)
    lib = usable(*tensors) if fits else None
    if lib is None:
        return False
    (q1, *q2), (k1, *k2) = queries, keys
    q2, k2 = (q2[0], k2[0]) if q2 else (None, None)
    args = ExtendArgs(
        *(None if t is None else t.data_ptr() for t in (q1, q2, k1, k2, values, out)),
        *q1.stride()[:2],
        *(q2.stride()[:2] if q2 is not None else (0, 0)),
        *k1.stride()[:2],
        *(k2.stride()[:2] if k2 is not None else (0, 0)),
        *values.stride()[:2],
        *out.stride()[:2],
        T,
        H,
        G,
        q1.shape[-1],
        0 if q2 is None else q2.shape[-1],
        values.shape[-1],
        S - T,
        scale,
    )
    status = lib.extend_attention(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"extend_attention: out of memory for {T} queries over {S} positions"
    return True


class DecodeArgs(ctypes.Structure):
    """mla_decode's and mha_decode's operands (kernels.c's Decode): pointers, then sizes and strides in floats, then
    the softmax scale and the norm's eps. cache0 and cache1 are the pool's first two quantities (absorbed: latent and
    rope key; naive: keys and values); kv and the rest of the new entries None where they are stored already."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("q_nope", "q_pe", "kv", "norm", "rot", "slots", "wkv_b")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("cache0", "cache1", "block_table", "lengths", "out")]
    _fields_ += [(name, ctypes.c_int64) for name in ("R", "H", "D", "P", "V", "C", "nb", "bs")]
    _fields_ += [(name, ctypes.c_int64) for name in ("q_rs", "q_hs", "p_rs", "p_hs")]
    _fields_ += [("scale", ctypes.c_float), ("eps", ctypes.c_float)]


@dataclass
class NewEntries:
    """What mla_decode stores before it attends: each row's new latent and rope key as wkv_a gives them, kv [R, C + P],
    normalised (kv_norm's weight and eps) and rotated (rotations [R, P / 2] complex64) into the pool at slots [R]."""

    kv: torch.Tensor
    norm_weight: torch.Tensor
    eps: float
    rotations: torch.Tensor
    slots: torch.Tensor

    def fits(self) -> bool:
        """Whether the kernels can read these as they lie (their dtypes are checked with the other operands')."""
        rotations = self.rotations
        contiguous = self.kv.is_contiguous() and rotations.is_contiguous()
        return contiguous and rotations.dtype == torch.complex64 and self.slots.dtype == torch.int64


def decode_args(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    wkv_b: torch.Tensor | None,
    caches: tuple[torch.Tensor, torch.Tensor],
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    new: NewEntries | None,
    latent_dim: int,
) -> DecodeArgs:
    """The struct both decode kernels take, from their operands (tensors as pointers, contiguous where the kernel
    reads them so)."""
    (rows, heads, nope), rope_dim = q_nope.shape, q_pe.shape[-1]

    def pointer(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return DecodeArgs(
        q_nope=pointer(q_nope), q_pe=pointer(q_pe), kv=pointer(None if new is None else new.kv),
        norm=pointer(None if new is None else new.norm_weight), rot=pointer(None if new is None else new.rotations),
        slots=pointer(None if new is None else new.slots), wkv_b=pointer(wkv_b), cache0=pointer(caches[0]),
        cache1=pointer(caches[1]), block_table=pointer(block_table), lengths=pointer(lengths), out=pointer(out),
        R=rows, H=heads, D=nope, P=rope_dim, V=out.shape[-1], C=latent_dim, nb=block_table.shape[1],
        bs=caches[0].shape[1], q_rs=q_nope.stride(0), q_hs=q_nope.stride(1), p_rs=q_pe.stride(0),
        p_hs=q_pe.stride(1), scale=scale, eps=0.0 if new is None else new.eps,
    )  # fmt: skip


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    wkv_b: torch.Tensor,
    latent: torch.Tensor,
    pe: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    new: NewEntries | None = None,
) -> torch.Tensor | None:
    """MLA decode in the absorbed form, one new token per row: q_nope [R, H, D] and q_pe [R, H, P] (each head's last
    dimension contiguous; q_pe rotated unless `new` is given), wkv_b [H, D + V, C], the pool's latent [blocks, bs, C]
    and pe [blocks, bs, P], row r over its positions 0 .. lengths[r] - 1 in block_table [R, nb]; the output
    [R, H, V]. With `new`, the rows' new entries are stored first and q_pe rotated here: one call for all of
    attention's glue. None where the kernel does not apply (not fp32 on the CPU, C not a multiple of 16, switched off,
    not built): the caller computes it with PyTorch."""
    fits = latent.shape[-1] % 16 == 0 and all(t.is_contiguous() for t in (wkv_b, latent, pe))
    fits = fits and block_table.dtype == lengths.dtype == torch.int64 and q_nope.stride(-1) == q_pe.stride(-1) == 1
    fits = fits and (new is None or new.fits())
    lib = usable(q_nope, q_pe, wkv_b, latent, pe, *(() if new is None else (new.kv, new.norm_weight))) if fits else None
    if lib is None:
        return None
    (rows, heads, nope), nb, bs = q_nope.shape, block_table.shape[1], latent.shape[1]
    out = q_nope.new_empty(rows, heads, wkv_b.shape[1] - nope)
    block_table, lengths = block_table.contiguous(), lengths.contiguous()
    new = None if new is None else replace(new, slots=new.slots.contiguous())
    args = decode_args(q_nope, q_pe, wkv_b, (latent, pe), block_table, lengths, out, scale, new, latent.shape[-1])
    status = lib.mla_decode(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"mla_decode: lengths {lengths.tolist()} outside 1 .. {nb * bs}, or out of memory"
    return out


def mha_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    wkv_b: torch.Tensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    new: NewEntries | None = None,
) -> torch.Tensor | None:
    """Multi-head attention of one new token per row over the pool in place (MLA's naive form): the query's parts
    q_nope [R, H, D] and q_pe [R, H, P] (each head's last dimension contiguous; q_pe rotated unless `new` is given),
    the pool's keys [blocks, bs, H, D + P] and values [blocks, bs, H, V], row r over its positions
    0 .. lengths[r] - 1 in block_table [R, nb]; the output [R, H, V]. With `new`, the rows' new entries are stored
    first (the latent normalised and taken to keys and values by wkv_b [H, D + V, C], needed only here, the rope key
    rotated) and q_pe rotated here. None where the kernel does not apply (not fp32 on the CPU, V not a multiple of 8,
    switched off, not built)."""
    fits = values.shape[-1] % 8 == 0 and keys.is_contiguous() and values.is_contiguous()
    fits = fits and block_table.dtype == lengths.dtype == torch.int64 and q_nope.stride(-1) == q_pe.stride(-1) == 1
    fits = fits and (new is None or (new.fits() and wkv_b is not None and wkv_b.is_contiguous()))
    operands = (q_nope, q_pe, keys, values, *(() if new is None else (wkv_b, new.kv, new.norm_weight)))
    lib = usable(*operands) if fits else None
    if lib is None:
        return None
    (rows, heads, _), nb, bs = q_nope.shape, block_table.shape[1], keys.shape[1]
    out = q_nope.new_empty(rows, heads, values.shape[-1])
    block_table, lengths = block_table.contiguous(), lengths.contiguous()
    new = None if new is None else replace(new, slots=new.slots.contiguous())
    latent_dim = 0 if new is None else wkv_b.shape[-1]
    wkv_b = None if new is None else wkv_b  # read only to store the new entries
    args = decode_args(q_nope, q_pe, wkv_b, (keys, values), block_table, lengths, out, scale, new, latent_dim)
    status = lib.mha_decode(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"mha_decode: lengths {lengths.tolist()} outside 1 .. {nb * bs}, or out of memory"
    return out


class IndexTopkArgs(ctypes.Structure):
    """index_topk's operands (kernels.c's IndexTopk): pointers, then sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "weights", "keys", "block_table", "lengths")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("scores", "spare", "positions", "counts")]
    _fields_ += [(name, ctypes.c_int64) for name in ("R", "H", "D", "nb", "bs", "K")]


def index_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3.2's indexer for decode rows: queries q [R, H, D] with per-head weights [R, H] scored over the pool's
    indexer keys [blocks, bs, D] in place (row r over its positions 0 .. lengths[r] - 1 through block_table [R, nb]),
    and each row's k best positions, ascending, ties to the earlier (the torch backend's rule): positions [R, k] and
    their counts [R] (min(lengths[r], k); a row's positions past its count are 0). None where the kernel
    does not apply (not fp32 on the CPU, D not a multiple of 8, switched off, not built)."""
    fits = keys.is_contiguous() and keys.shape[-1] % 8 == 0 and block_table.dtype == lengths.dtype == torch.int64
    lib = usable(q, weights, keys) if fits else None
    if lib is None:
        return None
    q, weights = q.contiguous(), weights.contiguous()
    (rows, heads, dim), (nb, bs) = q.shape, (block_table.shape[1], keys.shape[1])
    block_table, lengths = block_table.contiguous(), lengths.contiguous()
    scores, spare = q.new_empty(rows, nb * bs), q.new_empty(nb * bs)
    positions, counts = torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, dtype=torch.int64)
    pointers = (q, weights, keys, block_table, lengths, scores, spare, positions, counts)
    args = IndexTopkArgs(*(t.data_ptr() for t in pointers), rows, heads, dim, nb, bs, k)
    status = lib.index_topk(ctypes.byref(args), torch.get_num_threads())
    assert status == 0, f"index_topk: lengths {lengths.tolist()} outside 1 .. {nb * bs}"
    return positions, counts
