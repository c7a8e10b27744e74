"""One decode step of DeepSeek-V2-Lite's real structure on a GPU (27 layers, 64 routed experts, random weights, TP 1,
absorb form, bf16 compute): the torch backend against the cuda backend, eager and replayed as a CUDA graph, against
the bandwidth floor.

    python scripts/bench_cuda_step.py [--rows 1,8,64] [--history 1024,16384] [--weights fp8,bf16] [--out FILE.json]
    python scripts/bench_cuda_step.py --dry-run    # the tiny config on the CPU under Triton's interpreter: plumbing

Each configuration fills a pool with `history` tokens of random cache entries per row (blocks scattered), then times
one decode step of `rows` rows (median of several, after warm-up): torch backend eager, cuda backend eager, and the
cuda backend's step held as the engine holds it with --cuda-graphs (tp_infer.engine.graphs.CapturedDecode: captured
as a CUDA graph over static buffers, block tables as wide as the model's max_seq_len; its launches are sized from
shapes alone, so the whole step can be captured), timed per step as the engine runs it: the inputs copied into the
buffers, the replay, the logits copied out. In a dry run the stand-in capture (the same callable on the same buffers)
takes the CUDA graph's place. The floor is the bytes a step must read, every weight it uses once
(of the routed experts the expected distinct ones, of the embedding the rows' rows) and the rows' cache once, over the
device's measured copy bandwidth. The outputs of the backends are compared (the largest logit difference relative to
the largest logit), and the graph's against the eager cuda backend's. A configuration whose pool would not fit the
free memory is skipped with a line saying so. Each capture's start-up line (its time, the memory of the graphs' pool)
is printed after the table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 64
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import copy_bandwidth, parse_list, timed  # noqa: E402
from step_counts import minimum_bytes  # noqa: E402


def parse_names(ctx, param, value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    wrong = [n for n in names if n not in ("fp8", "bf16")]
    if not names or wrong:
        raise click.BadParameter(f"{value!r}: fp8, bf16 or both, comma-separated")
    return names


def build(config: Path, weights: str, device: torch.device, max_seq_len: int):
    """The config's model with random weights made on the device (FP8 with 128x128 block scales for "fp8")."""
    from tp_infer.backends import reference
    from tp_infer.config import load_config
    from tp_infer.model.transformer import Transformer

    args = load_config(config, dtype="bf16", attn_impl="absorb", max_seq_len=max_seq_len)
    args = args.with_options(fp8_weights=weights == "fp8")
    with torch.device(device):
        model = Transformer(args, backend=reference())
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dtype == torch.float8_e4m3fn:
                for part in t.view(-1, *t.shape[-2:]):  # one matrix at a time: the fp32 temporaries stay small
                    noise = torch.randn(part.shape, generator=generator, device=device)
                    part.copy_(noise.mul_(100).clamp_(-400, 400).to(t.dtype))
            elif name.endswith("scale"):
                t.copy_(torch.rand(t.shape, generator=generator, device=device).add_(0.5) / 100 / math.sqrt(args.dim))
            elif "norm" in name:
                t.copy_(torch.rand(t.shape, generator=generator, device=device) + 0.5)
            elif "embed" in name:
                t.copy_(torch.randn(t.shape, generator=generator, device=device))
            else:
                for part in t.view(-1, t.shape[-1]).split(4096):
                    part.copy_(torch.randn(part.shape, generator=generator, device=device) / math.sqrt(t.shape[-1]))
    return model.eval()


def pool_and_step(model, rows: int, history: int, device: torch.device):
    """A pool holding `rows` histories of random entries (each row's blocks scattered), and the decode step's plan."""
    from tp_infer.engine.runner import StepPlan
    from tp_infer.kv.pool import KVPool
    from tp_infer.model.attention import cache_layout

    per_row = -(-(history + 1) // BLOCK_SIZE)
    pool = KVPool.of(cache_layout(model.args, 1), rows * per_row, BLOCK_SIZE, device, spare=1)  # a held step's padding
    generator = torch.Generator(device).manual_seed(1)
    for part in pool.named.values():
        for piece in part.view(-1, part.shape[-1]).split(1 << 20):
            piece.copy_(torch.randn(piece.shape, generator=generator, device=device).to(piece.dtype))
    order = torch.randperm(rows * per_row, generator=torch.Generator().manual_seed(2)).tolist()
    tables = [order[r * per_row : (r + 1) * per_row] for r in range(rows)]
    plan = StepPlan.from_rows([(tables[r], history, [(7 * r + 5) % 997 + 2]) for r in range(rows)])
    return pool, plan


def held_step(model, pool, plan, rows: int, device: torch.device):
    """The cuda backend's decode step of `rows` rows held as the engine holds it with --cuda-graphs: (graphs, its
    start-up line), or (None, why) where capture fails."""
    from tp_infer.engine.graphs import CapturedDecode, CudaGraphCapture, StandInCapture

    try:
        capture = CudaGraphCapture(device) if device.type == "cuda" else StandInCapture()
        graphs = CapturedDecode(model, pool, rows, model.args.max_seq_len, capture, sizes=[rows])
        line = graphs.warm_up()
        assert graphs.takes(plan), "the step is decode alone within its bucket"
        return graphs, line
    except Exception as e:  # any failure to capture is reported, and the rest goes on
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def measure(model, rows: int, history: int, device: torch.device, repeats: int, bandwidth: float) -> dict:
    """One configuration's figures: the floor and the median step of each way of running it, and how far the cuda
    backend's logits are from the torch backend's; {"skipped": why} where its pool would not fit."""
    from tp_infer.backends import reference
    from tp_infer.backends.cuda import CudaBackend
    from tp_infer.engine.runner import build_batch
    from tp_infer.model.attention import cache_layout

    if device.type == "cuda":  # the pool, the torch backend's gathered history of a layer, and room
        free, _ = torch.cuda.mem_get_info(device)
        need = rows * (history + 1) * cache_layout(model.args, 1).bytes_per_token * 1.2 + (4 << 30)
        if need > free:
            return {"skipped": f"the pool needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} free"}
    pool, plan = pool_and_step(model, rows, history, device)
    tokens, batch = plan.tokens.to(device), build_batch(plan, BLOCK_SIZE, device)  # built once: the step alone is timed

    def step(backend):
        model.use_backend(backend)
        return model(tokens, batch, pool.layers)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    with torch.no_grad():
        expected, got = step(reference()), step(CudaBackend())
        diff = relative(got, expected)
        theirs = timed(functools.partial(step, reference()), device, repeats)
        ours = timed(functools.partial(step, CudaBackend()), device, repeats)
        model.use_backend(CudaBackend())
        graphs, line = held_step(model, pool, plan, rows, device)
        graph_s, graph_diff, note = math.nan, math.nan, ""
        if graphs is None:
            note = f" (graph: {line})"
        else:
            graph_diff = relative(graphs.run(plan).to(got.device), got)
            graph_s = timed(functools.partial(graphs.run, plan), device, repeats)
    floor_s = sum(minimum_bytes(model, rows, history).values()) / bandwidth
    return dict(
        rows=rows, history=history, floor_s=floor_s, torch_s=theirs,
        cuda_s=ours, cuda_graph_s=graph_s, max_logit_diff_relative=diff, graph_vs_eager_diff_relative=graph_diff,
        capture=line, note=note,
    )  # fmt: skip


@click.command()
@click.option("--rows", default="1,8,64", show_default=True, callback=parse_list, help="Decode rows.")
@click.option("--history", default="1024,16384", show_default=True, callback=parse_list, help="Tokens of history.")
@click.option("--weights", default="fp8,bf16", show_default=True, callback=parse_names, help="Weight dtypes.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed steps each.")
@click.option("--dry-run", is_flag=True, help="The tiny config on the CPU under Triton's interpreter: the plumbing.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def main(rows, history, weights, repeats, dry_run, out) -> None:
    """One V2-Lite decode step: torch backend, cuda backend, cuda backend as a CUDA graph, against the floor."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        config, device, rows, history, repeats = ROOT / "configs" / "config_tiny.json", "cpu", [1, 2], [40], 1
    else:
        config, device = ROOT / "configs" / "config_16B.json", "cuda"
        if not torch.cuda.is_available():
            raise click.UsageError("no CUDA device here: run with --dry-run on a machine without a GPU")
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}, "
          f"measured copy bandwidth {bandwidth / 1e9:,.0f} GB/s, model {config.name}")  # fmt: skip
    print("| weights | rows | history | floor (ms) | torch (ms) | cuda (ms) | cuda graph (ms) | torch / cuda "
          "| cuda graph / floor | max logit diff (rel.) | graph vs eager (rel.) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for weight_dtype in weights:
        model = build(config, weight_dtype, device, max(history) + 64)
        for n_history in history:
            for n_rows in rows:
                entry = measure(model, n_rows, n_history, device, repeats, bandwidth)
                if "skipped" in entry:
                    print(f"| {weight_dtype} | {n_rows} | {n_history:,} | skipped: {entry['skipped']} |")
                    continue
                entry["weights"] = weight_dtype
                results.append(entry)
                times = " | ".join(f"{entry[k] * 1e3:.2f}" for k in ("floor_s", "torch_s", "cuda_s", "cuda_graph_s"))
                ratios = f"{entry['torch_s'] / entry['cuda_s']:.1f}x | {entry['cuda_graph_s'] / entry['floor_s']:.2f}x"
                diff = f"{entry['max_logit_diff_relative']:.1e}{entry['note']}"
                diff += f" | {entry['graph_vs_eager_diff_relative']:.1e}"
                print(f"| {weight_dtype} | {n_rows} | {n_history:,} | {times} | {ratios} | {diff} |")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for entry in results:
        where = f"{entry['weights']} weights, {entry['rows']} rows, {entry['history']:,} tokens"
        print(f"capture, {where}: {entry['capture']}")
    if out:
        Path(out).write_text(json.dumps({"bandwidth": bandwidth, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
