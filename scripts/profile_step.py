"""Where a step's time goes: decode at batch 1 and a cold prefill on the benchmarks' random tiny DeepSeek-V3 model.

    OMP_NUM_THREADS=2 python scripts/profile_step.py [--config configs/config_bench.json] [--dtype fp32]
        [--device cpu|cuda] [--threads 2] [--attn-impl absorb|naive] [--seed 0] [--history 1000] [--decode-steps 50]
        [--prefill-tokens 1000] [--prefill-repeats 3] [--extend-tokens 60] [--profile-steps 10] [--counts]
        [--out FILE.json]

One process, world size 1, the model of scripts/bench_pool.py's random_model (fp32 by default) on --device (the CPU
by default, or one GPU: every timer then waits for the GPU's queued work before it reads the clock). Four
measurements (a fifth with --counts), each printed as a small markdown table, all figures written to --out:

1. decode: one session with --history tokens of history generating greedy tokens, alone in the engine. Medians over
   --decode-steps steps (after warm-up) of the whole Engine.step, and, on steps alternating with those, of its
   parts: schedule, runner.forward (which builds the batch and runs the model), postprocess; on the same plans,
   build_batch alone and the model call alone (on a batch built beforehand). Bookkeeping = schedule + postprocess
   (whole step - runner.forward is printed as a check: medians of different steps, it can come out negative).
2. prefill: --prefill-tokens random tokens with nothing cached, in one chunk, timed the same way (median of
   --prefill-repeats after one unmeasured); then one more under torch.profiler (CPU, and CUDA on a GPU;
   record_shapes=False) with each module's forward wrapped in record_function, for a breakdown by module kind and the
   top-10 aten ops by self CPU time (on a GPU: by the time of the kernels each launched; the engine's ranges stay in
   CPU time). --profile-steps decode steps are profiled the same way.
3. extend: --extend-tokens new tokens appended to one conversation of --history tokens (then grown by each timed
   turn), as a later turn of a chat computes them, timed and profiled as the prefill.
4. flops: the prefill's FLOPs counted from the config (projections, MLA in its expanded form, scores and values over
   the causal (query, key) pairs the kernel computes, the routed experts' top-k per token plus the shared expert,
   the dense MLP, the gate, the head on the last token) over the measured times, against torch.matmul of [N, dim] x
   [dim, inter] shapes timed in the same run, and the same products through kernels.linear.
5. with --counts, what a step does counted rather than timed, at DeepSeek-V3's structure as rank 0 of 8 (issue 27;
   scripts/step_counts.py, whose docstring says how): host syncs, FP8 dequantisations and aten ops per step of the
   torch backend in bf16 (decode at batch 1 and 8 over --history tokens, a 512-token prefill chunk), and bytes moved
   per decode step at the real widths (batch 1 and 64, 1K and 32K of context) against the minimum.

Progress goes to stderr, the tables to stdout.
"""

import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import click
import torch
from bench_common import (
    attn_impl_option,
    config_option,
    device_option,
    dtype_option,
    forward_flops,
    out_option,
    report,
    run_settings,
    seed_option,
    synchronize,
    threads_option,
    total_flops,
)
from bench_pool import BLOCK_SIZE, Prompts, random_model, runner_for
from step_counts import bytes_per_step, counts, print_bytes, print_counts
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import tp_infer.engine.runner as runner_module
from tp_infer.engine.engine import Engine
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.model import kernels
from tp_infer.model.attention import MLA
from tp_infer.model.moe import MLP, Gate, MoE
from tp_infer.model.transformer import Transformer

DECODE_WARMUP = 10
POOL_BLOCKS = 1024  # 16k tokens: the decode session and every prefill stay cached, nothing is evicted
# breakdown rows: label -> how it is computed from the profiler's ranges (inclusive CPU times)
KINDS = (
    "attention (MLA)",
    "MoE experts (shared + routed)",
    "MoE gate",
    "MoE dispatch/combine",
    "dense MLP",
    "norms",
    "embedding",
    "head",
    "other",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def timed(device: torch.device, fn: Callable, *args):
    """fn(*args) and its seconds, the GPU's work included: its queue is waited for before each clock read."""
    synchronize(device)
    t = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - t


# ---- module labels for the profiler ----------------------------------------------------------------------------------
def labels(model: Transformer) -> dict[torch.nn.Module, str]:
    """The modules whose forwards get a profiler range, each under its role (a module class can have several)."""
    out: dict[torch.nn.Module, str] = {model.embed: "embedding", model.head: "head", model.norm: "norms"}
    for block in model.layers:
        out[block.attn_norm] = out[block.ffn_norm] = "norms"
        out[block.attn] = "attention (MLA)"
        if isinstance(block.ffn, MoE):
            out[block.ffn] = "MoE"
            out[block.ffn.gate] = "MoE gate"
        else:
            out[block.ffn] = "dense MLP"
    assert {type(m) for m in out} >= {MLA, MoE, Gate, MLP}
    return out


@contextmanager
def module_ranges(model: Transformer, engine: Engine):
    """Wrap the labelled modules' forwards, the engine's schedule/postprocess and build_batch in record_function."""

    def wrap(fn, name):
        def wrapped(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return wrapped

    mods = labels(model)
    for m, name in mods.items():
        m.forward = wrap(m.forward, name)
    backend = model.backend  # the shared and routed experts in one backend call (decode's: one compiled call)
    backend.experts = wrap(backend.experts, "MoE experts (shared + routed)")
    original_build = runner_module.build_batch
    runner_module.build_batch = wrap(original_build, "build_batch")
    engine.schedule = wrap(engine.schedule, "engine.schedule")
    engine.postprocess = wrap(engine.postprocess, "engine.postprocess")
    model_forward = model.forward
    model.forward = wrap(model_forward, "model forward")
    try:
        yield
    finally:
        for m in [*mods, model]:
            del m.forward
        del backend.experts
        del engine.schedule, engine.postprocess
        runner_module.build_batch = original_build


def breakdown(prof, on_gpu: bool) -> dict:
    """Inclusive ms per range label, the module kinds made exclusive, and the top-10 aten ops by self time: CPU time,
    or on a GPU the time of the kernels each range or op launched (the engine's ranges stay in CPU time)."""
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]  # the ranges as the host ran them
    total_of, self_of = (
        ("device_time_total", "self_device_time_total") if on_gpu else ("cpu_time_total", "self_cpu_time_total")
    )
    cpu = {e.key: e.cpu_time_total / 1e3 for e in events}
    total = {e.key: getattr(e, total_of) / 1e3 for e in events}
    calls = {e.key: e.count for e in events}
    forward = total.get("model forward", 0.0)
    kinds = {k: total.get(k, 0.0) for k in KINDS if k not in ("MoE dispatch/combine", "other")}
    kinds["MoE dispatch/combine"] = total.get("MoE", 0.0) - sum(
        kinds[k] for k in ("MoE experts (shared + routed)", "MoE gate")
    )
    kinds["other"] = forward - sum(kinds.values())  # the rest of the forward (rope tables, residual adds, ...)
    kinds = {k: kinds[k] for k in KINDS}
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -getattr(e, self_of))
    self_total = sum(getattr(e, self_of) for e in events if e.key.startswith("aten::")) / 1e3
    return {
        "time": "GPU kernels" if on_gpu else "CPU",
        "model_forward_ms": forward,
        "engine_ms": {k: cpu.get(k, 0.0) for k in ("engine.schedule", "build_batch", "engine.postprocess")},
        "kinds_ms": kinds,
        "kind_calls": {k: calls.get(k, 0) for k in [*KINDS, "MoE"]},
        "aten_self_ms_total": self_total,
        "aten_ops_calls_total": sum(e.count for e in events if e.key.startswith("aten::")),
        "top_aten": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, self_of) / 1e3} for e in aten[:10]],
    }


def profiled(model: Transformer, engine: Engine, run: Callable[[], None], steps: int) -> dict:
    on_gpu = engine.runner.ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with module_ranges(model, engine), profile(activities=activities, record_shapes=False) as prof:
        run()
    r = breakdown(prof, on_gpu)
    r["steps"] = steps
    return r


# ---- 1. decode -------------------------------------------------------------------------------------------------------
def decode(model: Transformer, engine: Engine, prompts: Prompts, history: int, steps: int, profile_steps: int) -> dict:
    runner = engine.runner
    device = runner.ctx.device
    needed = DECODE_WARMUP + 2 * steps + profile_steps
    turn = engine.submit(
        Session("decode"), prompts(history), None, SamplingParams(max_new_tokens=needed + 2, ignore_eos=True)
    )
    while not turn.generated:
        engine.step()
    for _ in range(DECODE_WARMUP):
        engine.step()
    start_len = len(turn.tokens)
    log(f"decode: {history}-token history, {steps} whole steps alternating with {steps} split ones")
    whole: list[float] = []
    parts: dict[str, list[float]] = {k: [] for k in ("schedule", "forward", "postprocess", "build_batch", "model")}
    for _ in range(steps):
        whole.append(timed(device, engine.step)[1])
        step, t_sched = timed(device, engine.schedule)
        assert len(step.rows) == 1 and step.rows[0][1] == 1, "the decode session must be alone, one token a step"
        plan = step.plan
        batch, t_build = timed(device, runner_module.build_batch, plan, runner.pool.block_size, device)
        # the model alone on the same plan (it writes the same cache entries the real forward writes next)
        _, t_model = timed(device, model, plan.tokens.to(device), batch, runner.pool.layers, False, False)
        logits, t_fwd = timed(device, runner.forward, plan)
        _, t_post = timed(device, engine.postprocess, step, logits)
        for k, v in zip(parts, (t_sched, t_fwd, t_post, t_build, t_model), strict=True):
            parts[k].append(v)
    log(f"decode: {profile_steps} steps under the profiler")
    prof = profiled(model, engine, lambda: [engine.step() for _ in range(profile_steps)], profile_steps)
    end_len = len(turn.tokens)
    engine.run([turn])
    med = {k: statistics.median(v) for k, v in parts.items()}
    step_s = statistics.median(whole)
    return {
        "history_tokens": [start_len, end_len],
        "steps": steps,
        "step_s": step_s,
        "step_min_s": min(whole),
        "parts_s": med,
        "bookkeeping_s": med["schedule"] + med["postprocess"],
        "step_minus_forward_s": step_s - med["forward"],
        "forward_minus_build_model_s": med["forward"] - med["build_batch"] - med["model"],
        "profile": prof,
    }


def print_step_table(title: str, r: dict) -> None:
    p, step = r["parts_s"], r["step_s"]
    print(f"\n{title}")
    print("| part | median ms | share of step |")
    print("|---|---|---|")
    rows = [
        ("whole Engine.step", step),
        ("engine.schedule", p["schedule"]),
        ("runner.forward", p["forward"]),
        ("  build_batch (alone)", p["build_batch"]),
        ("  model call (alone, same plan)", p["model"]),
        ("  rest of runner.forward", r["forward_minus_build_model_s"]),
        ("engine.postprocess", p["postprocess"]),
        ("bookkeeping = schedule + postprocess", r["bookkeeping_s"]),
        ("check: whole step - runner.forward (medians)", r["step_minus_forward_s"]),
    ]
    for name, v in rows:
        print(f"| {name} | {ms(v)} | {v / step:.1%} |")


def print_profile(title: str, prof: dict) -> None:
    fwd, n = prof["model_forward_ms"], prof["steps"]
    clock = "" if prof["time"] == "CPU" else f", {prof['time']}' time"
    print(f"\n{title}: {n} step(s) under torch.profiler, model forward {fwd / n:.2f} ms/step (profiled{clock})")
    print("| module kind | ms/step | share of forward | ranges/step |")
    print("|---|---|---|---|")
    for k, v in prof["kinds_ms"].items():
        c = prof["kind_calls"].get(k, 0)
        print(
            f"| {k} | {v / n:.2f} | {v / fwd:.1%} | {c / n:.0f} |" if c else f"| {k} | {v / n:.2f} | {v / fwd:.1%} | |"
        )
    e = prof["engine_ms"]
    print(
        f"engine ranges (ms/step): schedule {e['engine.schedule'] / n:.2f}, build_batch {e['build_batch'] / n:.2f}, "
        f"postprocess {e['engine.postprocess'] / n:.2f}; aten ops/step {prof['aten_ops_calls_total'] / n:.0f}"
    )
    print(f"| top aten op (self {prof['time']}) | calls/step | self ms/step | share of aten self |")
    print("|---|---|---|---|")
    for op in prof["top_aten"]:
        print(
            f"| {op['op']} | {op['calls'] / n:.0f} | {op['self_ms'] / n:.2f} "
            f"| {op['self_ms'] / prof['aten_self_ms_total']:.1%} |"
        )


def print_decode(r: dict) -> None:
    a, b = r["history_tokens"]
    print_step_table(f"1. decode, batch 1, history {a}-{b} tokens, median of {r['steps']} steps", r)
    print(f"decode rate {1 / r['step_s']:.1f} tokens/s (min step {ms(r['step_min_s'])} ms)")
    print_profile("decode profile", r["profile"])


# ---- 2. prefill and 3. extend ----------------------------------------------------------------------------------------
def prefill(model: Transformer, engine: Engine, prompts: Prompts, tokens: int, repeats: int, history: int = 0) -> dict:
    """A step prefilling `tokens` new tokens: with nothing cached, or (history > 0) appended to one conversation of
    `history` tokens, which then grows by each timed turn."""
    runner = engine.runner
    device = runner.ctx.device
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True)
    parts: dict[str, list[float]] = {k: [] for k in ("step", "schedule", "forward", "postprocess", "build_batch")}
    conversation = Session("extend")
    if history:
        engine.generate(conversation, prompts(history), sampling)
    label = f"over a history of {history}" if history else "cold"
    for r in range(repeats + 1):
        log(f"prefill {r + 1}/{repeats + 1} ({tokens} tokens, {label}{', unmeasured' if r == 0 else ''})")
        turn = engine.append_turn(conversation if history else Session(f"prefill-{r}"), prompts(tokens), sampling)
        t0 = time.perf_counter()
        step, t_sched = timed(device, engine.schedule)
        assert len(step.rows) == 1 and step.rows[0][1] == tokens, "the prefill must be one chunk of its new tokens"
        logits, t_fwd = timed(device, runner.forward, step.plan)
        _, t_post = timed(device, engine.postprocess, step, logits)
        t_step = time.perf_counter() - t0
        _, t_build = timed(device, runner_module.build_batch, step.plan, runner.pool.block_size, device)
        engine.run([turn])
        if r:
            for k, v in zip(parts, (t_step, t_sched, t_fwd, t_post, t_build), strict=True):
                parts[k].append(v)
    log("prefill: one more under the profiler")
    turn = engine.append_turn(conversation if history else Session("prefill-profiled"), prompts(tokens), sampling)
    prof = profiled(model, engine, engine.step, 1)
    engine.run([turn])
    med = {k: statistics.median(v) for k, v in parts.items()}
    step_s = med.pop("step")
    return {
        "tokens": tokens,
        "history_tokens": history,
        "repeats": repeats,
        "step_s": step_s,
        "parts_s": {**med, "model": med["forward"] - med["build_batch"]},
        "bookkeeping_s": med["schedule"] + med["postprocess"],
        "step_minus_forward_s": step_s - med["forward"],
        "forward_minus_build_model_s": 0.0,
        "profile": prof,
    }


def print_prefill(r: dict) -> None:
    print_step_table(f"2. cold prefill of {r['tokens']} tokens, one chunk, median of {r['repeats']}", r)
    print(f"(model call = runner.forward - build_batch alone; prefill rate {r['tokens'] / r['step_s']:.0f} tokens/s)")
    print_profile("prefill profile", r["profile"])


def print_extend(r: dict) -> None:
    title = f"3. extend: {r['tokens']} new tokens on {r['history_tokens']}+ of history, median of {r['repeats']}"
    print_step_table(title, r)
    print_profile("extend profile", r["profile"])


# ---- 4. flops --------------------------------------------------------------------------------------------------------
def matmul_reference(n: int, args, device: torch.device, repeats: int = 5) -> list[dict]:
    """torch.matmul GFLOP/s of the prefill's shapes: [n, dim] x [dim, inter], and an expert's share of the tokens;
    and of the same products as the model runs them (kernels.linear: oneDNN's on the CPU in fp32)."""
    per_expert = n * args.n_activated_experts // args.n_routed_experts
    shapes = [
        (n, args.dim, args.inter_dim),
        (n, args.dim, args.moe_inter_dim),
        (per_expert, args.dim, args.moe_inter_dim),
    ]
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    out = []
    for m, k, nn in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, nn, dtype=dtype, device=device)
        torch.matmul(a, b)
        t = min(timed(device, torch.matmul, a, b)[1] for _ in range(repeats))
        kernels.linear(a, b.t())
        ours = min(timed(device, kernels.linear, a, b.t())[1] for _ in range(repeats))
        flop = 2 * m * k * nn
        out.append(
            {"shape": f"[{m}, {k}] x [{k}, {nn}]", "s": t, "gflops": flop / t / 1e9, "linear_gflops": flop / ours / 1e9}
        )
    return out


def flops(model: Transformer, pre: dict, device: torch.device) -> dict:
    args, n = model.args, pre["tokens"]
    counted = forward_flops(args, 0, n, BLOCK_SIZE, model.layers[0].attn.expanding_is_cheaper)
    kinds = pre["profile"]["kinds_ms"]
    parts = []
    for name, f in counted.items():
        t = kinds.get(name, 0.0) / 1e3 if not name.startswith(" ") else None
        parts.append({"part": name, "gflop": f / 1e9, "s": t, "gflops": f / t / 1e9 if t else None})
    total = total_flops(counted)
    ref = matmul_reference(n, args, device)
    achieved = total / pre["parts_s"]["model"] / 1e9
    return {
        "parts": parts,
        "total_gflop": total / 1e9,
        "model_s": pre["parts_s"]["model"],
        "achieved_gflops": achieved,
        "matmul_reference": ref,
        "ratio_to_best_reference": achieved / max(r["gflops"] for r in ref),
    }


def print_flops(r: dict) -> None:
    print("\n4. prefill FLOPs (counted from the config) over time (module times from the profiled prefill)")
    print("| part | GFLOP | ms | GFLOP/s |")
    print("|---|---|---|---|")
    for p in r["parts"]:
        t = f"{p['s'] * 1e3:.1f}" if p["s"] else ""
        g = f"{p['gflops']:.1f}" if p["gflops"] else ""
        print(f"| {p['part']} | {p['gflop']:.2f} | {t} | {g} |")
    print(
        f"| whole prefill (unprofiled model call) | {r['total_gflop']:.2f} | {r['model_s'] * 1e3:.1f} "
        f"| {r['achieved_gflops']:.1f} |"
    )
    print("| reference product | torch.matmul GFLOP/s | tp_infer's kernels.linear GFLOP/s |")
    print("|---|---|---|")
    for ref in r["matmul_reference"]:
        print(f"| {ref['shape']} | {ref['gflops']:.1f} | {ref['linear_gflops']:.1f} |")
    best_linear = max(ref["linear_gflops"] for ref in r["matmul_reference"])
    print(
        f"prefill achieves {r['achieved_gflops']:.1f} GFLOP/s = {r['ratio_to_best_reference']:.1%} of the best "
        f"reference torch.matmul, {r['achieved_gflops'] / best_linear:.1%} of the best kernels.linear"
    )


# ---- main ------------------------------------------------------------------------------------------------------------
@click.command()
@config_option()
@dtype_option()
@device_option()
@threads_option(2, "torch threads.")
@attn_impl_option("MLA form: the latent cache, or per-head keys and values.")
@seed_option()
@click.option("--history", default=1000, show_default=True, type=click.IntRange(min=1), help="Decode: history.")
@click.option("--decode-steps", default=50, show_default=True, type=click.IntRange(min=1), help="Decode: timed steps.")
@click.option("--prefill-tokens", default=1000, show_default=True, type=click.IntRange(min=2), help="Prefill length.")
@click.option("--prefill-repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed prefills.")
@click.option(
    "--extend-tokens", default=60, show_default=True, type=click.IntRange(min=2), help="Extend: new tokens a turn."
)
@click.option("--profile-steps", default=10, show_default=True, type=click.IntRange(min=1), help="Profiled decodes.")
@click.option("--counts", "with_counts", is_flag=True, help="Also count syncs, dequantisations, aten ops and bytes.")
@out_option()
def main(
    config: str,
    dtype: str,
    device: torch.device,
    threads: int,
    attn_impl: str,
    seed: int,
    history: int,
    decode_steps: int,
    prefill_tokens: int,
    prefill_repeats: int,
    extend_tokens: int,
    profile_steps: int,
    with_counts: bool,
    out: str | None,
) -> None:
    """Decode-step and prefill time, split by engine part and by module, and the prefill's GFLOP/s."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(threads)
    log(f"building a random model ({config}, {dtype}, {attn_impl}, {device}, {torch.get_num_threads()} threads)")
    model = random_model(config, dtype, seed, device, attn_impl)
    prompts = Prompts(seed, model.args.vocab_size)
    engine = Engine(runner_for(model, POOL_BLOCKS), max_num_batched_tokens=max(prefill_tokens, history, 512))
    results = {**run_settings(config, dtype, device, seed), "attn_impl": attn_impl}
    results["decode"] = decode(model, engine, prompts, history, decode_steps, profile_steps)
    results["prefill"] = prefill(model, engine, prompts, prefill_tokens, prefill_repeats)
    results["extend"] = prefill(model, engine, prompts, extend_tokens, prefill_repeats, history)
    results["flops"] = flops(model, results["prefill"], device)
    if with_counts:
        results["counts"] = counts([("torch backend, bf16", "bf16", "torch")], history, 512, [1, 8])
        results["bytes"] = bytes_per_step([1, 64], [1024, 32768])
    printers = {"decode": print_decode, "prefill": print_prefill, "extend": print_extend, "flops": print_flops}
    printers |= {"counts": print_counts, "bytes": print_bytes}
    report(results, printers, started, load_at_start, out)


if __name__ == "__main__":
    main()
