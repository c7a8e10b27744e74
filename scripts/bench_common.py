"""What the benchmarks share: random weights for their models, ours or transformers' (scaled as
tests/checkpoints.py's, so that activations and logits stay O(1) and routing matters), the closing line that
says how loaded the machine was, the wait for a GPU's queued work before a clock is read, and the command-line options
they have in common (one place for each: the same name, type and default everywhere, the help text where a script says
more)."""

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from tp_infer.distributed import resolve_device

BENCH_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config_bench.json"
OptionDecorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Norms near 1, a real routing bias, unit embeddings, 1/sqrt(fan-in) matrices."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            elif name.endswith(("e_score_correction_bias", "gate.bias")):
                t.uniform_(-0.2, 0.2)
            elif "embed" in name:
                t.normal_(0, 1.0)
            elif t.dim() >= 2:
                t.normal_(0, 1 / math.sqrt(t.shape[-1]))


def forward_flops(
    args, start: int, n: int, block_size: int, expanding_is_cheaper: Callable[[int, int], bool]
) -> dict[str, float]:
    """Multiply-adds x 2 of a forward of one row's n new tokens at positions start .. start + n - 1, by part, as the
    model computes them. MLA: naive expands the new tokens' latents; absorb attends in latent space, or, where the
    model's rule (MLA.expanding_is_cheaper, given new tokens and cached positions) says so, expands the latent of
    every cached block first. The causal kernels compute each query against the keys up to its own; the head runs
    on the last token alone."""
    end = -(-(start + n) // block_size) * block_size  # positions the cached latent is read and expanded over
    expands = expanding_is_cheaper(n, end)
    pairs = n * start + n * (n + 1) // 2  # (query, key) pairs
    h, nope, rope, v = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    c, d = args.kv_lora_rank, args.dim
    q = d * h * (nope + rope) if args.q_lora_rank == 0 else d * args.q_lora_rank + args.q_lora_rank * h * (nope + rope)
    proj = 2 * n * (q + d * (c + rope) + h * v * d)  # wq(_a/_b), wkv_a, wo
    if args.attn_impl == "naive" or expands:
        expand = 2 * (end if args.attn_impl == "absorb" else n) * c * h * (nope + v)
        scores = 2 * pairs * h * (nope + rope + v)  # q k^T and p v
    else:  # queries into latent space and back, scores over latent and rope key, probabilities times the latent
        expand, scores = 0, 2 * n * h * (nope * c + c * v) + 2 * pairs * h * (2 * c + rope)
    moe_layers, dense_layers = args.n_layers - args.n_dense_layers, args.n_dense_layers
    routed = 2 * 3 * d * args.moe_inter_dim * n * args.n_activated_experts
    shared = 2 * 3 * d * args.moe_inter_dim * args.n_shared_experts * n
    return {
        "attention (MLA)": args.n_layers * (proj + expand + scores),
        "  of which projections": args.n_layers * proj,
        "  of which latent expansion": args.n_layers * expand,
        "  of which scores and values": args.n_layers * scores,
        "MoE routed experts": moe_layers * routed,
        "MoE gate": moe_layers * 2 * n * d * args.n_routed_experts,
        "shared expert": moe_layers * shared,
        "dense MLP": dense_layers * 2 * 3 * n * d * args.inter_dim,
        "head": 2 * d * args.vocab_size,
    }


def total_flops(parts: dict[str, float]) -> float:
    """The sum of forward_flops' parts (the indented ones are shares of the one above them)."""
    return sum(f for name, f in parts.items() if not name.startswith(" "))


def runtime_line(runtime_s: float, load_at_start: float) -> tuple[str, dict]:
    """The closing line of a benchmark, and the load averages it names (timings on a loaded machine are skewed)."""
    load = {"start": load_at_start, "end": os.getloadavg()[0]}
    cores = os.cpu_count() or 1
    line = (
        f"\ntotal runtime {runtime_s:.0f} s; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end, on {cores} cores"
        + (": other jobs were running, the timings are skewed" if max(load.values()) > cores else "")
    )
    return line, load


def run_settings(config: str, dtype: str, device: torch.device, seed: int) -> dict:
    """What a benchmark's results open with: the model's config and dtype, where it ran, torch's threads, the seed."""
    return {
        "config": config,
        "dtype": dtype,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
    }


def python_path(*folders: Path) -> str:
    """A child process's PYTHONPATH: folders first, then whatever this process was given (where the packages of a
    machine without the venv may lie)."""
    given = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*map(str, folders), *([given] if given else [])])


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (nothing to wait for on the CPU), so that a clock read next counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(results: dict, printers: dict[str, Callable[[dict], None]], started: float, load_at_start: float, out):
    """Print each section measured (results[name] by printers[name]) and the closing line; --out gets the JSON."""
    for name, show in printers.items():
        if name in results:
            show(results[name])
    results["runtime_s"] = time.perf_counter() - started
    line, results["load_average_1min"] = runtime_line(results["runtime_s"], load_at_start)
    print(line)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


def config_option(
    *names: str, default: Path = BENCH_CONFIG, help: str = "Reference-style model config.", **kwargs: Any
) -> OptionDecorator:
    """--config: the config the random model is shaped by (names: main's parameter; kwargs: e.g. a type)."""
    return click.option("--config", *names, default=str(default), show_default=True, help=help, **kwargs)


def dtype_option(help: str = "Compute.") -> OptionDecorator:
    """--dtype: fp32 by default, as bf16 matmuls are slow on CPU."""
    return click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]), help=help)


def attn_impl_option(help: str) -> OptionDecorator:
    """--attn-impl: tp_infer's MLA form, absorb (the latent cache) by default, or naive (per-head keys and values)."""
    return click.option(
        "--attn-impl", default="absorb", show_default=True, type=click.Choice(["absorb", "naive"]), help=help
    )


def device_option(help: str = "Where the model runs: the CPU or one GPU (world size 1).") -> OptionDecorator:
    """--device: cpu or cuda, handed to main as a torch.device; cuda on a machine without one fails at once."""

    def resolve(ctx: click.Context, param: click.Parameter, value: str) -> torch.device:
        try:
            return resolve_device(value)
        except ValueError as e:
            raise click.ClickException(str(e)) from None

    return click.option(
        "--device",
        default="cpu",
        show_default=True,
        type=click.Choice(["cpu", "cuda"]),
        callback=resolve,
        help=help,
    )


def out_option(help: str = "Write every figure as JSON.") -> OptionDecorator:
    """--out: the JSON file the results go to (report writes it)."""
    return click.option("--out", type=click.Path(dir_okay=False), help=help)


def threads_option(
    default: int | None = None, help: str = "torch threads (default: torch's choice)."
) -> OptionDecorator:
    """--threads: torch's thread count, left to torch unless a script sets a default."""
    shown = {} if default is None else {"default": default, "show_default": True}
    return click.option("--threads", type=click.IntRange(min=1), help=help, **shown)


def seed_option(help: str = "Weights and token ids.") -> OptionDecorator:
    """--seed: of the random weights and of whatever else a run draws."""
    return click.option("--seed", default=0, show_default=True, type=int, help=help)


def work_dir_option(help: str) -> OptionDecorator:
    """--work-dir: a folder for the files a run writes (a temporary one unless given)."""
    return click.option("--work-dir", type=click.Path(file_okay=False), help=help)


def rounds_option(help: str) -> OptionDecorator:
    """--rounds: interleaved repetitions of what a benchmark compares, whose medians it reports."""
    return click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help=help)


def turns_option(default: int, help: str = "User messages.") -> OptionDecorator:
    """--turns: turns of each conversation."""
    return click.option("--turns", default=default, show_default=True, type=click.IntRange(min=1), help=help)


def reply_tokens_option(default: int, help: str, fewest: int = 2) -> OptionDecorator:
    """--reply-tokens: greedy tokens of each reply, eos ignored (at least 2 where decode speed is timed)."""
    return click.option(
        "--reply-tokens", default=default, show_default=True, type=click.IntRange(min=fewest), help=help
    )


def sections_options(sections: Sequence[str]) -> OptionDecorator:
    """What a benchmark of sections opens with: --config --dtype --device --out --only (one section) --threads
    --seed."""
    only = click.option("--only", type=click.Choice(sections), help="Run one measurement.")
    options = (config_option(), dtype_option(), device_option(), out_option(), only, threads_option(), seed_option())
    return lambda f: functools.reduce(lambda g, option: option(g), reversed(options), f)
