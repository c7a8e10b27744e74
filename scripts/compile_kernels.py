"""Compile the cuda backend's Triton kernels for a GPU architecture without a GPU (Triton's own ptxas, ahead of time):
each kernel in the variants the backend launches (bf16, fp16 and fp32 activations; bf16 and FP8 caches and weights),
one line per variant with the compile time and the shared memory it needs; exit status 1 if any fails. What the
interpreter cannot catch (types the compiler refuses, shared memory past the GPU's) shows here.

    python scripts/compile_kernels.py [--arch 90] [--quick]

Run without TRITON_INTERPRET (the interpreter has nothing to compile)."""

from __future__ import annotations

import sys
import time

import click

# shared memory one block may use, by architecture (bytes): sm80 and sm90 (H100/H200), sm89 (L4, L40)
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def variants(quick: bool) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, pointer types, constexprs, launch options) for every variant to compile: the pointer types
    the backend's launches pass (other arguments are i32, sm_scale fp32)."""
    from tp_infer.backends import triton_kernels as tk

    out = []
    activations = [("bf16", False, "tf32"), ("fp32", True, "ieee")] + ([] if quick else [("fp16", False, "tf32")])
    for cache in ("bf16", "fp8e4nv"):
        scale = "fp32" if cache == "fp8e4nv" else cache
        for act, upcast, precision in activations:
            pointers = dict(
                q_latent=act, q_pe=act, latent=cache, latent_scale=scale, rope=cache, rope_scale=scale,
                table="i64", lengths="i64", partial="fp32", partial_lse="fp32",
            )  # fmt: skip
            constexprs = dict(
                BLOCK_H=16, BLOCK_N=32, BLOCK_C=512, BLOCK_P=64, FP8=cache == "fp8e4nv", UPCAST=upcast,
                PRECISION=precision,
            )  # fmt: skip
            options = dict(num_warps=8, num_stages=1 if upcast else 2)
            out.append(
                (f"absorbed decode, {act} queries, {cache} cache", tk._absorbed_split, pointers, constexprs, options)
            )
        pointers = dict(
            q="bf16", keys=cache, key_scale=scale, values=cache, value_scale=scale, table="i64", lengths="i64",
            partial="fp32", partial_lse="fp32",
        )  # fmt: skip
        constexprs = dict(BLOCK_N=32, BLOCK_D=256, BLOCK_V=128, FP8=cache == "fp8e4nv")
        out.append((f"per-head decode, {cache} cache", tk._per_head_split, pointers, constexprs, {}))
    pointers = dict(partial="fp32", partial_lse="fp32", out="bf16")
    out.append(("decode combine", tk._combine, pointers, dict(BLOCK_S=64, BLOCK_D=128), {}))
    for act, upcast, precision in activations:
        block_k = 64 if upcast else 128
        settings = dict(SCALE_BLOCK=128, UPCAST=upcast, PRECISION=precision)
        for block_m in (16, 64):
            pointers = dict(x=act, w="fp8e4nv", scale="fp32", y=act)
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, **settings)
            out.append((f"block-FP8 product, {act}, {block_m} rows", tk._fp8_linear, pointers, constexprs, {}))
        pointers = dict(
            x=act, tokens="i64", pair_weights=act, w1="fp8e4nv", s1="fp32", w3="fp8e4nv", s3="fp32",
            tile_expert="i64", tile_start="i64", tile_end="i64", hidden=act,
        )  # fmt: skip
        constexprs = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, **settings)
        out.append((f"experts gate and up, {act}", tk._experts_up, pointers, constexprs, {}))
        pointers = dict(
            hidden=act, w2="fp8e4nv", s2="fp32", tile_expert="i64", tile_start="i64", tile_end="i64", out=act
        )
        constexprs = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, **settings)
        out.append((f"experts down, {act}", tk._experts_down, pointers, constexprs, {}))
        for along_rows in (True, False):
            pointers = dict(x=act, w="fp8e4nv", scale="fp32", y=act)
            constexprs = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32 if upcast else 64, K_ALONG_ROWS=along_rows, **settings)
            label = f"per-head FP8 product ({'w_k' if along_rows else 'w_v'}), {act}"
            out.append((label, tk._fp8_heads, pointers, constexprs, {}))
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
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


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
            shared = compile_one(kernel, pointers, constexprs, options, arch).metadata.shared
        except Exception as e:  # every failure is reported, and the rest compiled
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            continue
        took = time.perf_counter() - start
        over = limit is not None and shared > limit
        failed += over
        note = f" (over sm{arch}'s {limit:,})" if over else ""
        print(f"{'FAIL' if over else 'ok  '} {label}: {took:.1f} s, {shared:,} B of shared memory{note}")
    print(f"{failed} of {len(variants(quick))} variants failed for sm{arch}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
