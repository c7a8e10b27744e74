"""What the benchmarks share: random weights for their models, ours or transformers' (scaled as
tests/checkpoints.py's, so that activations and logits stay O(1) and routing matters), and the closing line that
says how loaded the machine was."""

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


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
