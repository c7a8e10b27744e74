"""Compiled CPU kernels for what PyTorch runs slowly at decode (kernels.c): a few rows of activations times a weight
matrix, which MKL computes on one core at a third of the memory bandwidth (2-3x faster here up to 8 rows), and
MLA's decode in the absorbed form over the paged cache in place, without gathering its blocks.

Built on first use with the system's C compiler into a per-user cache (1-3 s here, once per source and machine;
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
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]
# rows up to which one small_matmul beats MKL, which is blocked for arithmetic (measured: 2-3x to 8 rows, 1.7x at
# 12, even at 16)
MAX_ROWS = 12
# rows up to which two calls, each reading the weight, still beat MKL (measured at the bench model's shapes, weights
# cold: 1.1-2.2x at 13-16 rows, 0.8-1.6x at 24, the vocabulary head 1.6-2.2x throughout); more go to F.linear
SPLIT_ROWS = 2 * MAX_ROWS

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use the compiled kernels where they apply (the default) or always PyTorch's."""
    global _enabled
    _enabled = enabled


def cache_dir() -> Path:
    """Where the built kernels are kept: the user's cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tp_infer"


def build(compiler: str, path: Path) -> None:
    """Compile kernels.c to path: beside it under a temporary name, then renamed, as ranks and test processes may
    build at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, str(SOURCE), "-o", partial, *LIBS]
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
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS, *LIBS, platform.machine()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{tag}.so"
    try:
        if not path.exists():
            build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"tp_infer: CPU kernels not built ({detail}); using PyTorch's", stacklevel=2)
        return None
    lib.small_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.small_matmul.restype = ctypes.c_int
    lib.mla_decode.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int]
    lib.mla_decode.restype = ctypes.c_int
    return lib


def usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, where they apply to these operands: switched on, all fp32 on the CPU, the library built."""
    if not (_enabled and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)):
        return None
    return library()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] times weight [N, K] transposed: the compiled product for 1 to SPLIT_ROWS fp32 rows on the CPU (in
    two calls past MAX_ROWS), else F.linear."""
    rows = x.shape[0] if x.dim() == 2 else 0
    lib = usable(x, weight) if 0 < rows <= SPLIT_ROWS and weight.is_contiguous() else None
    if lib is None:
        return F.linear(x, weight)
    x = x.contiguous()
    y = x.new_empty(rows, weight.shape[0])
    threads, chunk = torch.get_num_threads(), (rows + 1) // 2 if rows > MAX_ROWS else rows
    for start in range(0, rows, chunk):  # row slices of x and y are contiguous: the kernel takes them in place
        part = min(chunk, rows - start)
        lib.small_matmul(x[start].data_ptr(), weight.data_ptr(), y[start].data_ptr(), part, *weight.shape, threads)
    return y


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    wkv_b: torch.Tensor,
    latent: torch.Tensor,
    pe: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """MLA decode in the absorbed form, one new token per row: q_nope [R, H, D] and q_pe [R, H, P] (rotated), wkv_b
    [H, D + V, C], the pool's latent [blocks, bs, C] and pe [blocks, bs, P], row r over its positions
    0 .. lengths[r] - 1 in block_table [R, nb]; the output [R, H, V]. None where the kernel does not apply (not fp32 on
    the CPU, C not a multiple of 16, switched off, not built): the caller computes it with PyTorch."""
    fits = latent.shape[-1] % 16 == 0 and all(t.is_contiguous() for t in (wkv_b, latent, pe))
    fits = fits and block_table.dtype == lengths.dtype == torch.int64
    lib = usable(q_nope, q_pe, wkv_b, latent, pe) if fits else None
    if lib is None:
        return None
    (rows, heads, nope), rope, (nb, bs) = q_nope.shape, q_pe.shape[-1], (block_table.shape[1], latent.shape[1])
    v_dim, width = wkv_b.shape[1] - nope, latent.shape[-1]
    out = q_nope.new_empty(rows, heads, v_dim)
    queries, rows_of_table = (q_nope.contiguous(), q_pe.contiguous()), (block_table.contiguous(), lengths.contiguous())
    pointers = (*queries, wkv_b, latent, pe, *rows_of_table, out)
    shape = (rows, heads, nope, v_dim, width, rope, nb, bs)
    status = lib.mla_decode(*(t.data_ptr() for t in pointers), *shape, scale, torch.get_num_threads())
    assert status == 0, f"mla_decode: lengths {lengths.tolist()} outside 1 .. {nb * bs}, or out of memory"
    return out
