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

Then DeepSeek-V3.2's sparse decode (--topk, 2,048 as the real model; histories longer than it): the same widths with
the lightning indexer's keys cached beside (64 heads of 128), each row's attention over its top-k positions by index
score; both backends score and select on the device (the cuda backend's index score kernel and one topk, then its
paged decode over the selected positions in place; the torch backend's scores over the gathered keys, a stable sort
and attention over the gathered blocks with that mask). Its bytes: every indexer key of each row's history, and the
latents and rope keys of its top-k positions.
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


def layer(heads: int, device: torch.device, **options):
    """An MLA layer at V2-Lite's attention widths with `heads` local heads (and any other config `options`), random
    bf16 wkv_b."""
    from tp_infer.config import load_config
    from tp_infer.model.attention import MLA
    from tp_infer.model.layers import TensorParallel

    args = load_config(ROOT / "configs" / "config_16B.json", dtype="bf16", attn_impl="absorb").with_options(
        n_heads=heads, **options
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


def sparse_layer(heads: int, topk: int, device: torch.device):
    """layer()'s widths with V3.2's lightning indexer (64 heads of 128, q_lora_rank 1,536) keeping topk positions."""
    return layer(heads, device, q_lora_rank=1536, index_n_heads=64, index_head_dim=128, index_topk=topk)


def sparse_decode_group(mla, rows: int, history: int, cache_dtype: torch.dtype, device: torch.device):
    """decode_group() with the indexer keys cached as the third quantity, and the rows' indexer queries and weights
    (IndexQueries)."""
    from tp_infer.kv.pool import LayerCache
    from tp_infer.model.attention import IndexQueries

    q, dense, group = decode_group(mla, rows, history, cache_dtype, device)
    blocks, indexer = dense.tensors[0].data.shape[0], mla.indexer
    cache = LayerCache(
        blocks, BLOCK_SIZE, [(mla.kv_lora_rank,), (mla.rope_dim,), (indexer.head_dim,)], cache_dtype, device
    )
    cache.tensors[:2] = dense.tensors
    generator = torch.Generator(device).manual_seed(1)
    for b in range(0, blocks, 1024):
        n = min(1024, blocks - b) * BLOCK_SIZE
        slots = torch.arange(b * BLOCK_SIZE, b * BLOCK_SIZE + n, device=device)
        cache.tensors[2].write(slots, torch.randn(n, indexer.head_dim, generator=generator, device=device))
    index = IndexQueries(
        q=torch.randn(rows, indexer.heads, indexer.head_dim, generator=generator, device=device).bfloat16(),
        weights=torch.randn(rows, indexer.heads, generator=generator, device=device) * indexer.weight_scale,
        key=torch.empty(0, device=device),
    )
    return q, cache, group, index


def bytes_read(mla, rows: int, history: int, cache_dtype: torch.dtype) -> int:
    """What a decode group's attention must read: each row's history of latents and rope keys (FP8: with one fp32
    scale per token each) and wkv_b in bf16."""
    per_token = (mla.kv_lora_rank + mla.rope_dim) * cache_dtype.itemsize
    if cache_dtype == torch.float8_e4m3fn:
        per_token += 2 * 4
    return rows * (history + 1) * per_token + mla.local_heads * (mla.nope_dim + mla.v_dim) * mla.kv_lora_rank * 2


def sparse_bytes_read(mla, rows: int, history: int, cache_dtype: torch.dtype) -> int:
    """What a V3.2 decode group must read: each row's indexer keys over its whole history (FP8: with their scales),
    the latents and rope keys of its top-k positions, and wkv_b in bf16."""
    per_key = mla.indexer.head_dim * cache_dtype.itemsize + (4 if cache_dtype == torch.float8_e4m3fn else 0)
    attended = bytes_read(mla, rows, min(history + 1, mla.indexer.topk) - 1, cache_dtype)
    return attended + rows * (history + 1) * per_key


@click.command()
@click.option("--device", default="cuda", show_default=True, help="Where to run (cuda; cpu with --dry-run).")
@click.option("--rows", default="1,64", show_default=True, callback=parse_list, help="Decode rows per group.")
@click.option("--history", default="1024,16384", show_default=True, callback=parse_list, help="Tokens of history.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed calls each.")
@click.option("--topk", default=2048, show_default=True, type=click.IntRange(min=1), help="V3.2: positions kept.")
@click.option("--dry-run", is_flag=True, help="Tiny shapes on the CPU under Triton's interpreter: the plumbing.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def main(device, rows, history, repeats, topk, dry_run, out) -> None:
    """Paged MLA decode: the cuda backend's Triton kernel against the torch backend, against the bandwidth floor."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        device, rows, history, repeats, topk = "cpu", [1, 3], [17, 70], 1, 16
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
    for sparse in (False, True):
        for label, heads in widths.items():
            mla = sparse_layer(heads, topk, device) if sparse else layer(heads, device)
            label = f"V3.2 top {topk:,}, {label}" if sparse else label
            wkv_b = mla.wkv_b_heads(torch.bfloat16)
            for cache_name, cache_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
                for n_rows in rows:
                    for n_history in [h for h in history if not sparse or h + 1 > topk]:
                        entry = measure(
                            cuda, torch_backend, mla, wkv_b, n_rows, n_history, cache_dtype, device, repeats, bandwidth
                        )
                        results.append(dict(widths=label, cache=cache_name, **entry))
                        times = f"{entry['torch_s'] * 1e6:,.0f} | {entry['cuda_s'] * 1e6:,.0f}"
                        print(
                            f"| {label} | {cache_name} | {n_rows} | {n_history:,} | {times} "
                            f"| {entry['torch_s'] / entry['cuda_s']:.1f}x | {entry['bytes'] / 1e6:,.1f} "
                            f"| {entry['floor_s'] * 1e6:,.0f} | {entry['cuda_s'] / entry['floor_s']:.2f}x "
                            f"| {entry['max_diff_relative']:.1e} |"
                        )
    if out:
        Path(out).write_text(json.dumps({"bandwidth": bandwidth, "results": results}, indent=2) + "\n")


def measure(cuda, torch_backend, mla, wkv_b, rows, history, cache_dtype, device, repeats, bandwidth) -> dict:
    """One configuration: both backends' attention of a decode group (sparse where mla has an indexer), timed and
    compared."""
    sparse = mla.indexer is not None
    if sparse:
        q, cache, group, index = sparse_decode_group(mla, rows, history, cache_dtype, device)
        operands, moved = (mla, q, wkv_b, cache, group, index), sparse_bytes_read(mla, rows, history, cache_dtype)
    else:
        q, cache, group = decode_group(mla, rows, history, cache_dtype, device)
        operands, moved = (mla, q, wkv_b, cache, group), bytes_read(mla, rows, history, cache_dtype)
    with torch.no_grad():
        expected = torch_backend.attend(*operands)
        got = cuda.attend(*operands)
        ours = timed(functools.partial(cuda.attend, *operands), device, repeats)
        theirs = timed(functools.partial(torch_backend.attend, *operands), device, repeats)
    diff = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert diff < 0.05, f"the cuda backend's decode differs from the torch backend's by {diff:.2e}"
    return dict(
        rows=rows, history=history, torch_s=theirs, cuda_s=ours, bytes=moved, floor_s=moved / bandwidth,
        max_diff_relative=diff,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
