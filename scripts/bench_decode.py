"""Paged MLA decode attention on a GPU: the cuda backend's Triton kernel (tp_infer.backends.cuda) against the torch
backend's attention, one layer's decode group over the paged pool, against the bandwidth floor.

    python scripts/bench_decode.py [--device cuda] [--rows 1,64] [--history 1024,16384] [--out FILE.json]
    python scripts/bench_decode.py --dry-run     # the CPU, Triton's interpreter, tiny histories: plumbing only

Widths: 16 local heads of 128 + 64 rope and v 128 over a 512-wide latent, which is DeepSeek-V2-Lite at TP 1 and
DeepSeek-V3 as rank 0 of 8 alike, and V3's 128 heads at TP 1; absorb form, bf16 compute, bf16 and FP8 caches; each
row's blocks scattered over the pool. Each configuration prints the median time of a decode group's attention
(storing the new entries excluded; both backends take the query into latent space and back out by wkv_b), the
bytes it must read (each row's history of latents and rope keys, with FP8 scales, and wkv_b in bf16), the floor
(those bytes over the device's measured copy bandwidth), and the largest difference between the two outputs
relative to the largest output. --dry-run checks the outputs on tiny shapes and times nothing that means anything.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 64
WIDTHS = {"16 heads (V2-Lite TP 1, V3 TP 8)": 16, "128 heads (V3 TP 1)": 128}


def parse_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated positive integers, e.g. 1,64") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: comma-separated positive integers, e.g. 1,64")
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of one device-to-device copy of 1 GiB (read plus write), the best of five."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.nbytes / best


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def layer(heads: int, device: torch.device):
    """An MLA layer at V2-Lite's attention widths with `heads` local heads, random bf16 wkv_b."""
    from tp_infer.config import load_config
    from tp_infer.model.attention import MLA
    from tp_infer.model.layers import TensorParallel

    args = load_config(ROOT / "configs" / "config_16B.json", dtype="bf16", attn_impl="absorb").with_options(
        n_heads=heads
    )
    with torch.device(device):
        mla = MLA(args, TensorParallel(0, 1), torch.bfloat16)
    with torch.no_grad():
        mla.wkv_b.weight.normal_(0, 1 / math.sqrt(args.kv_lora_rank))
    return mla


def decode_group(mla, rows: int, history: int, cache_dtype: torch.dtype, device: torch.device):
    """A pool layer holding `rows` histories of `history` tokens (random entries, blocks scattered), one new query
    per row, and the decode group over them."""
    from tp_infer.kv.pool import LayerCache
    from tp_infer.model.batch import AttentionGroup

    per_row = -(-(history + 1) // BLOCK_SIZE)
    blocks = rows * per_row
    cache = LayerCache(blocks, BLOCK_SIZE, [(mla.kv_lora_rank,), (mla.rope_dim,)], cache_dtype, device)
    generator = torch.Generator(device).manual_seed(0)
    for tensor in cache.tensors:
        for b in range(0, blocks, 1024):  # in slices, so that an FP8 write's fp32 temporaries stay small
            n = min(1024, blocks - b) * BLOCK_SIZE
            slots = torch.arange(b * BLOCK_SIZE, b * BLOCK_SIZE + n, device=device)
            width = tensor.data.shape[-1]
            tensor.write(slots, torch.randn(n, width, generator=generator, device=device, dtype=torch.bfloat16))
    table = torch.randperm(blocks, generator=generator, device=device).view(rows, per_row)
    lengths = torch.full((rows,), history + 1, device=device)
    visible = torch.arange(per_row * BLOCK_SIZE, device=device) < lengths[:, None, None]
    group = AttentionGroup(start=0, rows=rows, width=1, block_table=table, visible=visible, lengths=lengths)
    q = torch.randn(rows, mla.local_heads, mla.nope_dim + mla.rope_dim, generator=generator, device=device)
    return q.bfloat16(), cache, group


def bytes_read(mla, rows: int, history: int, cache_dtype: torch.dtype) -> int:
    """What a decode group's attention must read: each row's history of latents and rope keys (FP8: with one fp32
    scale per token each) and wkv_b in bf16."""
    per_token = (mla.kv_lora_rank + mla.rope_dim) * cache_dtype.itemsize
    if cache_dtype == torch.float8_e4m3fn:
        per_token += 2 * 4
    return rows * (history + 1) * per_token + mla.local_heads * (mla.nope_dim + mla.v_dim) * mla.kv_lora_rank * 2


@click.command()
@click.option("--device", default="cuda", show_default=True, help="Where to run (cuda; cpu with --dry-run).")
@click.option("--rows", default="1,64", show_default=True, callback=parse_list, help="Decode rows per group.")
@click.option("--history", default="1024,16384", show_default=True, callback=parse_list, help="Tokens of history.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed calls each.")
@click.option("--dry-run", is_flag=True, help="Tiny shapes on the CPU under Triton's interpreter: the plumbing.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def main(device, rows, history, repeats, dry_run, out) -> None:
    """Paged MLA decode: the cuda backend's Triton kernel against the torch backend, against the bandwidth floor."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        device, rows, history, repeats = "cpu", [1, 3], [17, 70], 1
        widths = {"16 heads (V2-Lite TP 1, V3 TP 8)": 16}
    else:
        widths = WIDTHS
        if device == "cuda" and not torch.cuda.is_available():
            raise click.UsageError("no CUDA device here: run with --dry-run on a machine without a GPU")
    from tp_infer.backends import reference
    from tp_infer.backends.cuda import CudaBackend

    device = torch.device(device)
    cuda, torch_backend = CudaBackend(), reference()
    click.echo(cuda.prepare(), err=True)
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:,.0f} GB/s")
    print("| widths | cache | rows | history | torch backend (us) | cuda backend (us) | speed-up | bytes (MB) "
          "| floor (us) | cuda / floor | max diff (rel.) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for label, heads in widths.items():
        mla = layer(heads, device)
        wkv_b = mla.wkv_b_heads(torch.bfloat16)
        for cache_name, cache_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            for n_rows in rows:
                for n_history in history:
                    q, cache, group = decode_group(mla, n_rows, n_history, cache_dtype, device)
                    with torch.no_grad():
                        expected = torch_backend.attend(mla, q, wkv_b, cache, group)
                        got = cuda.attend(mla, q, wkv_b, cache, group)
                        operands = (mla, q, wkv_b, cache, group)
                        ours = timed(functools.partial(cuda.attend, *operands), device, repeats)
                        theirs = timed(functools.partial(torch_backend.attend, *operands), device, repeats)
                    diff = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
                    moved = bytes_read(mla, n_rows, n_history, cache_dtype)
                    floor = moved / bandwidth
                    entry = dict(
                        widths=label, cache=cache_name, rows=n_rows, history=n_history, torch_s=theirs, cuda_s=ours,
                        bytes=moved, floor_s=floor, max_diff_relative=diff,
                    )  # fmt: skip
                    results.append(entry)
                    times = f"{theirs * 1e6:,.0f} | {ours * 1e6:,.0f} | {theirs / ours:.1f}x"
                    print(
                        f"| {label} | {cache_name} | {n_rows} | {n_history:,} | {times} | {moved / 1e6:,.1f} "
                        f"| {floor * 1e6:,.0f} | {ours / floor:.2f}x | {diff:.1e} |"
                    )
                    assert diff < 0.05, f"the cuda backend's decode differs from the torch backend's by {diff:.2e}"
    if out:
        Path(out).write_text(json.dumps({"bandwidth": bandwidth, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
