"""Compile the cuda backend's Triton kernels for a GPU architecture without a GPU (Triton's own ptxas, ahead of time):
each kernel in the variants the backend launches (bf16, fp16 and fp32 activations; bf16 and FP8 caches and weights),
one line per variant with the compile time, the shared memory it needs and its registers and spills (from the cubin,
by the cuobjdump Triton ships); exit status 1 if any fails. What the
interpreter cannot catch (types the compiler refuses, shared memory past the GPU's) shows here.

    python scripts/compile_kernels.py [--arch 90] [--quick]

Run without TRITON_INTERPRET (the interpreter has nothing to compile)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

# shared memory one block may use, by architecture (bytes): sm80 and sm90 (H100/H200), sm89 (L4, L40)
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def variants(quick: bool) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, pointer types, constexprs, launch options) for every variant to compile: the pointer types
    the backend's launches pass (other arguments are i32, sm_scale fp32)."""
    import torch

    from tp_infer.backends import triton_kernels as tk
    from tp_infer.backends.cuda import DECODE_BLOCK_H, decode_block_n

    TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = []
    activations = [("bf16", False, "tf32"), ("fp32", True, "ieee")] + ([] if quick else [("fp16", False, "tf32")])
    for cache in ("bf16", "fp8e4nv"):
        scale = "fp32" if cache == "fp8e4nv" else cache
        for act, upcast, precision in activations:
            for sparse in (False, True):  # over each row's history, or over V3.2's selected positions
                pointers = dict(
                    q_latent=act, q_pe=act, latent=cache, latent_scale=scale, rope=cache, rope_scale=scale,
                    table="i64", lengths="i64", selected="i64", partial="fp32", partial_lse="fp32",
                )  # fmt: skip
                constexprs = dict(
                    BLOCK_H=DECODE_BLOCK_H, BLOCK_N=decode_block_n(512), BLOCK_C=512, BLOCK_P=64,
                    FP8=cache == "fp8e4nv", SELECTED=sparse, UPCAST=upcast, PRECISION=precision,
                )  # fmt: skip
                options = dict(num_warps=8, num_stages=1 if upcast else 2)
                label = f"absorbed decode{', sparse' if sparse else ''}, {act} queries, {cache} cache"
                out.append((label, tk._absorbed_split, pointers, constexprs, options))
            # V3.2's index scores: 64 heads of 128 over the cached indexer keys
            pointers = dict(
                q=act, weights="fp32", keys=cache, key_scale=scale, table="i64", lengths="i64", scores="fp32"
            )
            block_n, warps = tk.index_tiles(TORCH_DTYPES[act])
            constexprs = dict(
                BLOCK_H=64, BLOCK_N=block_n, BLOCK_D=128, FP8=cache == "fp8e4nv", UPCAST=upcast, PRECISION=precision
            )
            label = f"index scores, {act} queries, {cache} keys"
            out.append((label, tk._index_scores, pointers, constexprs, dict(num_warps=warps)))
        for sparse in (False, True):
            pointers = dict(
                q="bf16", keys=cache, key_scale=scale, values=cache, value_scale=scale, table="i64", lengths="i64",
                selected="i64", partial="fp32", partial_lse="fp32",
            )  # fmt: skip
            constexprs = dict(
                BLOCK_N=tk.PER_HEAD_BLOCK_N, BLOCK_D=256, BLOCK_V=128, FP8=cache == "fp8e4nv", SELECTED=sparse
            )
            label = f"per-head decode{', sparse' if sparse else ''}, {cache} cache"
            out.append((label, tk._per_head_split, pointers, constexprs, {}))
    pointers = dict(partial="fp32", partial_lse="fp32", out="bf16")
    out.append(("decode combine", tk._combine, pointers, dict(BLOCK_S=tk.COMBINE_BLOCK_S, BLOCK_D=128), {}))
    for act, upcast, precision in activations:
        dtype = TORCH_DTYPES[act]
        settings = dict(SCALE_BLOCK=128, UPCAST=upcast, PRECISION=precision)
        for rows in (1, 64):  # a decode step's products and wider ones
            tiles = tk.linear_tiles(rows, dtype)
            pointers = dict(x=act, w="fp8e4nv", scale="fp32", y=act)
            label = f"block-FP8 product, {act}, {tiles.m} x {tiles.n} x {tiles.k}"
            out.append((label, tk._fp8_linear, pointers, {**tiles.constexprs, **settings}, dict(num_warps=tiles.warps)))
        for pairs in (8, 512):  # a decode step's (token, expert) pairs, and a long step's
            up, down = tk.expert_tiles_of(pairs, dtype)
            pointers = dict(
                x=act, order="i64", pair_weights=act, bounds="i32", w1="fp8e4nv", s1="fp32", w3="fp8e4nv",
                s3="fp32", hidden=act,
            )  # fmt: skip
            experts = dict(BLOCK_E=32 if pairs == 8 else 256)  # 256 experts over 8 ranks, or on one
            label = f"experts gate and up, {act}, {up.m} pairs a tile"
            constexprs = {**up.constexprs, **experts, **settings}
            out.append((label, tk._experts_up, pointers, constexprs, dict(num_warps=up.warps)))
            pointers = dict(hidden=act, order="i64", bounds="i32", w2="fp8e4nv", s2="fp32", out=act)
            label = f"experts down, {act}, {down.m} pairs a tile"
            constexprs = {**down.constexprs, **experts, **settings}
            out.append((label, tk._experts_down, pointers, constexprs, dict(num_warps=down.warps)))
        tiles = tk.heads_tiles(dtype)
        for along_rows in (True, False):
            pointers = dict(x=act, w="fp8e4nv", scale="fp32", y=act)
            constexprs = dict(**tiles.constexprs, K_ALONG_ROWS=along_rows, **settings)
            label = f"per-head FP8 product ({'w_k' if along_rows else 'w_v'}), {act}"
            out.append((label, tk._fp8_heads, pointers, constexprs, dict(num_warps=tiles.warps)))
        # the small fused ops at DeepSeek-V3's widths: dim 7168 (norms), 64 rope dims over 128 / 8 heads
        out.append((f"activation quantisation, {act}", tk._quantize_rows, dict(x=act, q="fp8e4nv", scale="fp32"),
                    dict(BLOCK=128), {}))  # fmt: skip
        pointers = dict(x=act, weight=act, y=act)
        constexprs = dict(BLOCK_D=8192, FP32=act == "fp32")
        out.append((f"RMSNorm, {act}", tk._rms_norm, pointers, constexprs, dict(num_warps=8)))
        pointers = dict(x=act, rotations="fp32", y=act)
        out.append((f"rope, {act}", tk._rope, pointers, dict(BLOCK_H=16, PAIRS=32), {}))
    out.append(("expert schedule", tk._tile_schedule, dict(bounds="i32", expert_out="i64", start_out="i64",
                end_out="i64"), dict(BLOCK_M=16, BLOCK_E=256), {}))  # fmt: skip
    from tp_infer.backends import triton_router  # the router after its logits: V3's, and V2-Lite's softmax

    v3 = dict(n_experts=256, n_groups=8, topk_groups=4, topk=8, sigmoid=True, bias=True, route_norm=True)
    v2_lite = dict(n_experts=64, n_groups=1, topk_groups=1, topk=6, sigmoid=False, bias=False, route_norm=False)
    for label, router in (("V3", v3), ("V2-Lite", v2_lite)):
        constexprs, warps = triton_router.launch_settings(**router)
        pointers = dict(logits="fp32", bias="fp32", weights="bf16", indices="i64")
        out.append((f"router, {label}", triton_router._route, pointers, constexprs, dict(num_warps=warps)))
    return out


def compile_one(kernel, pointers: dict, constexprs: dict, options: dict, arch: int):
    """triton.compile of one variant for sm{arch}: its compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature, constants = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], constants[(i,)] = "constexpr", constexprs[name]
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "fp32" if name in ("sm_scale", "eps", "route_scale") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def registers(compiled) -> tuple[int, int] | None:
    """(registers per thread, bytes of stack and local memory per thread: spills) of a compiled kernel, read from its
    cubin by the cuobjdump that Triton ships; None where there is none."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() or "cubin" not in compiled.asm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    return (int(found.group(1)), int(found.group(2)) + int(found.group(3))) if found else None


@click.command()
@click.option("--arch", default=90, show_default=True, type=int, help="Compute capability x 10 (90: H100, H200).")
@click.option("--quick", is_flag=True, help="bf16 and fp32 activations only (the tests' choice).")
def main(arch: int, quick: bool) -> None:
    """Compile every kernel variant for sm{arch}; one line each; exit 1 if any fails."""
    from tp_infer.backends.cuda import interpreting

    if interpreting():
        raise click.UsageError("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    limit = SHARED_LIMITS.get(arch)
    failed = 0
    for label, kernel, pointers, constexprs, options in variants(quick):
        start = time.perf_counter()
        try:
            compiled = compile_one(kernel, pointers, constexprs, options, arch)
        except Exception as e:  # every failure is reported, and the rest compiled
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            continue
        took, shared = time.perf_counter() - start, compiled.metadata.shared
        over = limit is not None and shared > limit
        failed += over
        note = f" (over sm{arch}'s {limit:,})" if over else ""
        usage = registers(compiled)
        regs = "" if usage is None else f", {usage[0]} registers a thread, {usage[1]} B spilled"
        print(f"{'FAIL' if over else 'ok  '} {label}: {took:.1f} s, {shared:,} B of shared memory{note}{regs}")
    print(f"{failed} of {len(variants(quick))} variants failed for sm{arch}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
