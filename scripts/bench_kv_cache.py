"""KV-cache benchmark: bf16 against fp8 storage on the same random model, each in its own process, side by side.

    python scripts/bench_kv_cache.py [--config configs/config_bench.json] [--history 2000] [--decode 64]
        [--slots 8] [--device cpu|cuda]

For each cache dtype: cache bytes per token (formula and measured), the cache's total bytes, peak memory (on the CPU
the process's resident set, on a GPU the most torch allocated there), prefill time of --history tokens and decode
tokens per second. Prints a table and the ratios.
"""

import json
import resource
import subprocess
import sys

import click
import torch
from bench_common import config_option, device_option, fill_random

from tp_infer.config import load_config
from tp_infer.distributed import DistContext
from tp_infer.engine.engine import Engine
from tp_infer.engine.runner import ModelRunner
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.kv.memory import measured_bytes
from tp_infer.model.attention import cache_layout
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

BLOCK_SIZE = 16


def random_runner(
    config: str, kv_cache_dtype: str, history: int, decode: int, slots: int, device: torch.device
) -> ModelRunner:
    """A random model on device whose pool holds `slots` conversations of max_seq_len tokens."""
    args = load_config(config, dtype="bf16", kv_cache_dtype=kv_cache_dtype, max_batch_size=slots)
    args = args.with_options(max_seq_len=max(args.max_seq_len, history + decode))
    model = Transformer(args, TensorParallel())
    fill_random(model, 0)
    ctx = DistContext(0, 1, device)
    return ModelRunner(model.to(device).eval(), ctx, slots * args.max_seq_len // BLOCK_SIZE, BLOCK_SIZE)


def peak_mb(device: torch.device) -> float:
    """Peak memory of this process so far: the resident set on the CPU, torch's allocations on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20  # MiB, as ru_maxrss / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config: str, kv_cache_dtype: str, history: int, decode: int, slots: int, device: torch.device) -> dict:
    """One cache dtype, in this process: prefill `history` tokens, then decode `decode` greedy tokens."""
    torch.manual_seed(1)
    runner = random_runner(config, kv_cache_dtype, history, decode, slots, device)
    engine = Engine(runner, max_num_batched_tokens=history)
    prompt = torch.randint(2, runner.model.args.vocab_size, (history,)).tolist()
    turn = engine.generate(Session("bench"), prompt, SamplingParams(max_new_tokens=decode, ignore_eos=True))
    weights, cache = measured_bytes(runner.model, runner.pool)
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "bytes_per_token": cache_layout(runner.model.args, 1).bytes_per_token,
        "measured_bytes_per_token": cache // (runner.pool.num_blocks * runner.pool.block_size),
        "cache_mb": cache / 1e6,
        "weights_mb": weights / 1e6,
        "peak_mb": peak_mb(device),
        "prefill_s": turn.stats.ttft_s,
        "decode_tokens_per_s": turn.stats.decode_tokens_per_s,
    }


@click.command()
@config_option()
@click.option("--history", default=2000, show_default=True, help="Tokens prefilled before decoding.")
@click.option("--decode", default=64, show_default=True, help="Tokens decoded one by one.")
@click.option("--slots", default=8, show_default=True, help="The pool holds this many max_seq_len conversations.")
@device_option()
@click.option("--one", type=click.Choice(["bf16", "fp8"]), hidden=True, help="Measure one dtype (child process).")
def main(config: str, history: int, decode: int, slots: int, device: torch.device, one: str | None) -> None:
    """Cache bytes, peak memory and decode speed of a bf16 cache and an fp8 cache."""
    if one:
        print(json.dumps(measure(config, one, history, decode, slots, device)))
        return
    rows = []
    for dtype in ("bf16", "fp8"):  # a process each, so that peak memory is each one's own
        argv = [sys.executable, __file__, "--config", config, "--history", str(history), "--decode", str(decode)]
        argv += ["--slots", str(slots), "--device", device.type, "--one", dtype]
        rows.append(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout))
    peak = "peak GPU allocated" if device.type == "cuda" else "peak RSS"
    print(f"| cache | bytes/token | cache MB | weights MB | {peak} MB | prefill s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kv_cache_dtype']} | {r['measured_bytes_per_token']} | {r['cache_mb']:.1f} | {r['weights_mb']:.1f} "
            f"| {r['peak_mb']:.0f} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} |"
        )
    bf16, fp8 = rows
    assert bf16["measured_bytes_per_token"] == bf16["bytes_per_token"]
    assert fp8["measured_bytes_per_token"] == fp8["bytes_per_token"]
    print(
        f"fp8/bf16: bytes per token {fp8['bytes_per_token'] / bf16['bytes_per_token']:.3f}, "
        f"{peak} {fp8['peak_mb'] / bf16['peak_mb']:.3f}, "
        f"decode speed {fp8['decode_tokens_per_s'] / bf16['decode_tokens_per_s']:.3f}"
    )


if __name__ == "__main__":
    main()
