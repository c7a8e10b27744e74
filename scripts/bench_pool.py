"""Paged-pool benchmark: what one KV pool shared by every conversation, with a prefix tree over token ids, buys.

    python scripts/bench_pool.py [--config configs/config_bench.json] [--dtype fp32] [--device cpu|cuda]
        [--out FILE.json] [--only capacity|shared|decode] [--threads N] [--seed 0] [--slots 8]
        [--conversation-tokens 1000] [--system-tokens 2000] [--conversations 32] [--long-prompt-tokens 4000]

One process, world size 1, a random model of the config (fp32 compute by default: bf16 matmuls are slow on CPU) on
--device (the CPU by default, or one GPU; every time is taken after the logits reach the host).
Three measurements, each printed as a small table with its ratio and goal, all figures written to --out:

1. capacity: a pool with the memory of the old default (--slots x the config's max_seq_len tokens, one slot per
   running conversation) runs --conversation-tokens-token conversations one after the other (random prompt, a few
   greedy tokens, eos ignored) until the prefix tree first evicts; how many of them were wholly resident (every token,
   prompt and reply, matched by the tree) just before. Goal: at least 90% of pool tokens / conversation tokens; the
   old engine held --slots.
2. shared: --conversations single-turn conversations behind one --system-tokens system prompt, each with its own
   30-70 random tokens. Computed tokens must be the system prompt once plus everyone's own tokens; the time to first
   token of conversations 2.. against the same own tokens prefilled alone on an empty cache (a second pool on the same
   model, timed right before each) within 1.3x; pool blocks used against a copy of the system prompt each.
3. decode: four short conversations decode while a fifth with a --long-prompt-tokens prompt is submitted a few
   tokens in; the four's inter-token latencies (a timestamp per token from on_token) under policy "mixed" and
   "prefill_first" with the default 512-token step budget. Goal: prefill_first p99 / mixed p99 at least 3x; both
   policies must generate the same ids. Percentiles are nearest-rank (p99 of n latencies: the ceil(0.99 n)-th).

Progress goes to stderr, the tables to stdout.
"""

import itertools
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator

import click
import torch
from bench_common import fill_random, report, run_settings, sections_options

from tp_infer.config import ModelArgs, load_config
from tp_infer.distributed import DistContext
from tp_infer.engine.engine import Engine
from tp_infer.engine.runner import ModelRunner
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.model.attention import cache_layout
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

BLOCK_SIZE = 16
SECTIONS = ("capacity", "shared", "decode")

CAPACITY_REPLY = 4  # greedy tokens per capacity conversation: its prompt is the rest
SHARED_OWN = (30, 70)  # own tokens of each conversation behind the system prompt
SHARED_REPLY = 4
TTFT_GOAL = 1.3
DECODERS, DECODER_PROMPT, DECODER_TOKENS = 4, 100, 64
TOKENS_BEFORE_LONG = 4  # each decoder's tokens before the long prompt is submitted
LONG_REPLY = 8
ITL_GOAL = 3.0
DECODE_MAX_SEQ_LEN = 8192  # the long prompt plus its reply must fit


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least a share q of all values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Prompts:
    """Random token ids (0 and 1, bos/eos, left out) whose first tokens are all distinct, so that no two prompts share
    a cached prefix unless they are built to."""

    def __init__(self, seed: int, vocab_size: int):
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        firsts = list(range(2, vocab_size))
        self.rng.shuffle(firsts)
        self.firsts: Iterator[int] = iter(firsts)

    def __call__(self, length: int) -> list[int]:
        return [next(self.firsts)] + [self.rng.randrange(2, self.vocab_size) for _ in range(length - 1)]


# ---- model -----------------------------------------------------------------------------------------------------------
def random_model(config: str, dtype: str, seed: int, device: torch.device, attn_impl: str = "absorb") -> Transformer:
    """A random model of the config, scaled as scripts/bench_kv_cache.py's, with room for the decode section's long
    prompt (max_seq_len only sizes the rope tables); filled on the CPU, so the weights are the same on any device."""
    args = load_config(config, dtype=dtype, attn_impl=attn_impl)
    args = args.with_options(max_seq_len=max(args.max_seq_len, DECODE_MAX_SEQ_LEN))
    model = Transformer(args, TensorParallel())
    fill_random(model, seed)
    return model.to(device).eval()


def world_of_one(model: Transformer) -> DistContext:
    """Rank 0 of 1 on the model's device."""
    return DistContext(0, 1, model.head.weight.device)


def runner_for(model: Transformer, num_blocks: int) -> ModelRunner:
    return ModelRunner(model, world_of_one(model), num_blocks, BLOCK_SIZE)


def warm_up(model: Transformer, prompts: Prompts) -> None:
    """First-call allocations stay out of the timings: a short prompt and a 512-token chunk on a throwaway pool."""
    engine = Engine(runner_for(model, 64))
    sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for length in (16, 512):
        engine.generate(Session(f"warm-up-{length}"), prompts(length), sampling)


def resident(engine: Engine, tokens: list[int]) -> bool:
    """Every token of the conversation is in the prefix tree."""
    return engine.manager.tree.match(tokens, len(tokens)).length == len(tokens)


# ---- 1. capacity -----------------------------------------------------------------------------------------------------
def capacity(model: Transformer, config_args: ModelArgs, prompts: Prompts, slots: int, conv_tokens: int) -> dict:
    pool_tokens = slots * config_args.max_seq_len
    num_blocks = pool_tokens // BLOCK_SIZE
    runner = runner_for(model, num_blocks)
    per_token = cache_layout(model.args, 1).bytes_per_token
    engine = Engine(runner, max_num_batched_tokens=conv_tokens)
    sampling = SamplingParams(max_new_tokens=CAPACITY_REPLY, ignore_eos=True)
    fits = pool_tokens / conv_tokens
    cap = math.ceil(fits) + 4
    log(
        f"capacity: pool of {num_blocks} blocks x {BLOCK_SIZE} = {pool_tokens} tokens ({slots} x max_seq_len "
        f"{config_args.max_seq_len}); {conv_tokens}-token conversations until the first eviction (at most {cap})"
    )
    conversations: list[list[int]] = []
    held_before = None  # conversations wholly resident after the last conversation that evicted nothing
    wrong_counts = []
    started = time.perf_counter()
    for k in range(1, cap + 1):
        prompt = prompts(conv_tokens - CAPACITY_REPLY)
        turn = engine.generate(Session(f"capacity-{k}"), prompt, sampling)
        conversations.append(list(turn.tokens))
        if turn.stats.computed_tokens != len(prompt) or len(turn.tokens) != conv_tokens:
            wrong_counts.append((k, turn.stats.computed_tokens, len(turn.tokens)))
        usage = engine.cache_usage()
        count = sum(resident(engine, c) for c in conversations)
        log(f"  conversation {k}: computed {turn.stats.computed_tokens}, {count} wholly resident, {usage.describe()}")
        if usage.evicted_blocks:
            break
        held_before = count
    usage = engine.cache_usage()
    evicted = usage.evicted_blocks > 0
    return {
        "slots": slots,
        "pool_blocks": num_blocks,
        "block_size": BLOCK_SIZE,
        "pool_tokens": pool_tokens,
        "kv_bytes_per_token": per_token,
        "pool_bytes": per_token * pool_tokens,
        "pool_bytes_measured": runner.pool.nbytes,
        "conversation_tokens": conv_tokens,
        "reply_tokens": CAPACITY_REPLY,
        "conversations_run": len(conversations),
        "evicted": evicted,
        "evicted_blocks": usage.evicted_blocks,
        "preemptions": usage.preemptions,
        "held_without_eviction": held_before or 0,
        "resident_after_first_eviction": sum(resident(engine, c) for c in conversations) if evicted else None,
        "fits_ideal": fits,
        "goal": 0.9 * fits,
        "met": evicted and (held_before or 0) >= 0.9 * fits,
        "old_engine": slots,
        "wrong_counts": wrong_counts,
        "run_s": time.perf_counter() - started,
    }


def print_capacity(r: dict) -> None:
    print(f"\n1. capacity: {r['conversation_tokens']}-token conversations in one pool, one after the other")
    print("| pool blocks | pool tokens | pool MB | conversations run | held without eviction | goal | old engine |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['pool_blocks']} x {r['block_size']} | {r['pool_tokens']} | {r['pool_bytes'] / 1e6:.1f} "
        f"| {r['conversations_run']} | {r['held_without_eviction']} | >= {r['goal']:.1f} | {r['old_engine']} |"
    )
    print(
        f"pool bytes: {r['kv_bytes_per_token']} bytes/token x {r['pool_tokens']} tokens = {r['pool_bytes']} "
        f"(allocated: {r['pool_bytes_measured']})"
    )
    if not r["evicted"]:
        print(f"NO eviction after {r['conversations_run']} conversations (the cap): the count is a lower bound")
    else:
        print(
            f"first eviction during conversation {r['conversations_run']}: {r['evicted_blocks']} blocks evicted, "
            f"{r['resident_after_first_eviction']} conversations wholly resident after it"
        )
    ratio = r["held_without_eviction"] / r["fits_ideal"]
    print(
        f"held {r['held_without_eviction']} = {ratio:.1%} of pool tokens / {r['conversation_tokens']} "
        f"({r['fits_ideal']:.2f}); goal >= 90% ({r['goal']:.1f}): {'met' if r['met'] else 'MISSED'}; "
        f"old engine: {r['old_engine']} (one per slot), {r['held_without_eviction'] / r['old_engine']:.1f}x that"
    )
    if r["wrong_counts"]:
        print(f"WRONG counts (conversation, computed, tokens): {r['wrong_counts']}")


# ---- 2. shared system prompt -----------------------------------------------------------------------------------------
def shared(model: Transformer, prompts: Prompts, system_tokens: int, conversations: int) -> dict:
    system = prompts(system_tokens)
    owns = [prompts(prompts.rng.randint(*SHARED_OWN)) for _ in range(conversations)]
    per_conv = -(-(SHARED_OWN[1] + SHARED_REPLY + BLOCK_SIZE) // BLOCK_SIZE)
    num_blocks = -(-system_tokens // BLOCK_SIZE) + conversations * per_conv + 16
    engine = Engine(runner_for(model, num_blocks))  # system prompt + own tokens
    alone = Engine(runner_for(model, conversations * per_conv + 16))  # own tokens only, nothing that matches
    sampling = SamplingParams(max_new_tokens=SHARED_REPLY, ignore_eos=True)
    log(
        f"shared: {conversations} conversations behind a {system_tokens}-token system prompt, each timed against "
        f"its own tokens alone on an empty cache (pools of {num_blocks} and {alone.manager.num_blocks} blocks)"
    )
    rows = []
    for i, own in enumerate(owns, 1):
        base = alone.generate(Session(f"alone-{i}"), own, sampling)
        turn = engine.submit(Session(f"shared-{i}"), system + own, [system_tokens], sampling)
        engine.run([turn])
        s, b = turn.stats, base.stats
        rows.append(
            {
                "conversation": i,
                "own_tokens": len(own),
                "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.reused_tokens,
                "computed_tokens": s.computed_tokens,
                "ttft_s": s.ttft_s,
                "alone_computed_tokens": b.computed_tokens,
                "alone_ttft_s": b.ttft_s,
                "ttft_ratio": s.ttft_s / b.ttft_s,
                "tokens": len(turn.tokens),
            }
        )
        log(
            f"  conversation {i}: own {len(own)}, computed {s.computed_tokens} (reused {s.reused_tokens}), "
            f"ttft {s.ttft_s * 1e3:.0f} ms vs alone {b.ttft_s * 1e3:.0f} ms (computed {b.computed_tokens})"
        )
    usage = engine.cache_usage()
    later = [r["ttft_ratio"] for r in rows[1:]]
    computed = sum(r["computed_tokens"] for r in rows)
    expected = system_tokens + sum(map(len, owns))
    copies = sum(-(-r["tokens"] // BLOCK_SIZE) for r in rows)
    return {
        "conversations": conversations,
        "system_tokens": system_tokens,
        "own_tokens_total": sum(map(len, owns)),
        "computed_tokens": computed,
        "expected_computed_tokens": expected,
        "computed_as_expected": computed == expected,
        "alone_computed_as_expected": all(r["alone_computed_tokens"] == r["own_tokens"] for r in rows),
        "first_ttft_s": rows[0]["ttft_s"],
        "later_ttft_median_s": statistics.median(r["ttft_s"] for r in rows[1:]) if later else None,
        "later_alone_ttft_median_s": statistics.median(r["alone_ttft_s"] for r in rows[1:]) if later else None,
        "ttft_ratio_median": statistics.median(later) if later else None,
        "ttft_ratio_max": max(later) if later else None,
        "ttft_goal": TTFT_GOAL,
        "ttft_met": bool(later) and max(later) <= TTFT_GOAL,
        "pool_blocks": usage.total_blocks,
        "blocks_used": usage.used_blocks,
        "blocks_if_copied": copies,
        "evicted_blocks": usage.evicted_blocks,
        "preemptions": usage.preemptions,
        "rows": rows,
    }


def print_shared(r: dict) -> None:
    n = r["conversations"]
    print(f"\n2. shared system prompt: {n} conversations behind {r['system_tokens']} tokens, one after the other")
    print("| | computed tokens | TTFT 1st (ms) | TTFT 2..n median (ms) | alone median (ms) | blocks used |")
    print("|---|---|---|---|---|---|")
    print(
        f"| shared | {r['computed_tokens']} | {r['first_ttft_s'] * 1e3:.0f} | {r['later_ttft_median_s'] * 1e3:.0f} "
        f"| {r['later_alone_ttft_median_s'] * 1e3:.0f} | {r['blocks_used']} |"
    )
    print(f"| a copy each | {n * r['system_tokens'] + r['own_tokens_total']} | | | | {r['blocks_if_copied']} |")
    verdict = "equal" if r["computed_as_expected"] else "DIFFERENT"
    print(
        f"computed tokens {r['computed_tokens']}, system prompt once + own tokens = {r['system_tokens']} + "
        f"{r['own_tokens_total']} = {r['expected_computed_tokens']}: {verdict}"
        + ("" if r["alone_computed_as_expected"] else "; the empty-cache runs did NOT compute exactly their own tokens")
    )
    print(
        f"TTFT / own tokens alone on an empty cache, conversations 2..{n}: median {r['ttft_ratio_median']:.2f}x, "
        f"max {r['ttft_ratio_max']:.2f}x; goal <= {r['ttft_goal']}x: {'met' if r['ttft_met'] else 'MISSED'}"
    )
    print(
        f"pool blocks used {r['blocks_used']} of {r['pool_blocks']} vs {r['blocks_if_copied']} with a copy of the "
        f"system prompt each: {r['blocks_if_copied'] / r['blocks_used']:.1f}x fewer; "
        f"{r['evicted_blocks']} evicted, {r['preemptions']} preemptions"
    )


# ---- 3. decode during a long prefill ---------------------------------------------------------------------------------
def decode_run(model: Transformer, policy: str, short: list[list[int]], long: list[int]) -> dict:
    need = sum(-(-(len(p) + DECODER_TOKENS) // BLOCK_SIZE) for p in short) + -(-(len(long) + LONG_REPLY) // BLOCK_SIZE)
    engine = Engine(runner_for(model, need + 16), policy=policy)
    times: list[list[float]] = [[] for _ in range(len(short) + 1)]

    def clock(i: int):
        return lambda token: times[i].append(time.perf_counter())

    started = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=DECODER_TOKENS, ignore_eos=True)
    turns = [engine.submit(Session(f"{policy}-{i}"), p, None, sampling, clock(i)) for i, p in enumerate(short)]
    steps = 0
    while min(len(t.generated) for t in turns) < TOKENS_BEFORE_LONG:
        engine.step()
        steps += 1
    long_sampling = SamplingParams(max_new_tokens=LONG_REPLY, ignore_eos=True)
    long_turn = engine.submit(Session(f"{policy}-long"), long, None, long_sampling, clock(len(short)))
    before = [len(t.generated) for t in turns]
    engine.run()
    run_s = time.perf_counter() - started
    gaps = [b - a for ts in times[: len(short)] for a, b in itertools.pairwise(ts)]
    first_long = long_turn.first_token_at
    usage = engine.cache_usage()
    log(
        f"  {policy}: {steps} steps before the long prompt, run {run_s:.1f} s, inter-token p50 "
        f"{percentile(gaps, 0.5) * 1e3:.0f} ms p99 {percentile(gaps, 0.99) * 1e3:.0f} ms, "
        f"long ttft {long_turn.stats.ttft_s:.2f} s"
    )
    return {
        "policy": policy,
        "max_num_batched_tokens": engine.scheduler.max_tokens,
        "tokens_before_long": before,
        "tokens_after_long_first_token": [sum(t > first_long for t in ts) for ts in times[: len(short)]],
        "inter_token_latencies": len(gaps),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
        "itl_max_s": max(gaps),
        "itl_top_s": sorted(gaps)[-8:],
        "itl_p99_interpolated_s": statistics.quantiles(gaps, n=100, method="inclusive")[98],
        "long_ttft_s": long_turn.stats.ttft_s,
        "long_computed_tokens": long_turn.stats.computed_tokens,
        "run_s": run_s,
        "preemptions": usage.preemptions,
        "generated": [t.generated for t in [*turns, long_turn]],
        "token_times_s": [[round(t - started, 4) for t in ts] for ts in times],  # from the first submission
    }


def decode(model: Transformer, prompts: Prompts, long_tokens: int) -> dict:
    short = [prompts(DECODER_PROMPT) for _ in range(DECODERS)]
    long = prompts(long_tokens)
    if long_tokens + LONG_REPLY > model.args.max_seq_len:
        raise click.BadParameter(f"--long-prompt-tokens {long_tokens} + {LONG_REPLY} is past max_seq_len")
    log(
        f"decode: {DECODERS} conversations of {DECODER_PROMPT} tokens decoding {DECODER_TOKENS} tokens; a "
        f"{long_tokens}-token prompt submitted after {TOKENS_BEFORE_LONG} of them; policy mixed, then prefill_first"
    )
    mixed = decode_run(model, "mixed", short, long)
    first = decode_run(model, "prefill_first", short, long)
    same = [a == b for a, b in zip(mixed["generated"], first["generated"], strict=True)]
    ratio = first["itl_p99_s"] / mixed["itl_p99_s"]
    return {
        "decoders": DECODERS,
        "decoder_prompt_tokens": DECODER_PROMPT,
        "decoder_new_tokens": DECODER_TOKENS,
        "long_prompt_tokens": long_tokens,
        "long_new_tokens": LONG_REPLY,
        "max_seq_len": model.args.max_seq_len,
        "mixed": mixed,
        "prefill_first": first,
        "p99_ratio": ratio,
        "goal": ITL_GOAL,
        "met": ratio >= ITL_GOAL,
        "outputs_identical": all(same),
        "outputs_identical_each": same,
    }


def print_decode(r: dict) -> None:
    print(
        f"\n3. decode during a long prefill: {r['decoders']} x {r['decoder_prompt_tokens']}-token conversations "
        f"decoding {r['decoder_new_tokens']} tokens, a {r['long_prompt_tokens']}-token prompt submitted after "
        f"{TOKENS_BEFORE_LONG}, step budget {r['mixed']['max_num_batched_tokens']} tokens"
    )
    print("| policy | ITL p50 (ms) | ITL p99 (ms) | ITL max (ms) | long prompt TTFT (s) | run (s) |")
    print("|---|---|---|---|---|---|")
    for key in ("mixed", "prefill_first"):
        p = r[key]
        print(
            f"| {key} | {p['itl_p50_s'] * 1e3:.0f} | {p['itl_p99_s'] * 1e3:.0f} | {p['itl_max_s'] * 1e3:.0f} "
            f"| {p['long_ttft_s']:.2f} | {p['run_s']:.1f} |"
        )
    print(
        f"prefill_first p99 / mixed p99: {r['p99_ratio']:.1f}x; goal >= {r['goal']}x: "
        f"{'met' if r['met'] else 'MISSED'} (nearest-rank p99 of {r['mixed']['inter_token_latencies']} latencies)"
    )
    stalls = sum(g > r["mixed"]["itl_max_s"] for g in r["prefill_first"]["itl_top_s"])
    print(
        f"{stalls} prefill_first latencies are longer than mixed's longest; p99 interpolated linearly instead "
        f"(sensitive here, the stalls being about 1% of the latencies): "
        f"mixed {r['mixed']['itl_p99_interpolated_s'] * 1e3:.0f} ms, "
        f"prefill_first {r['prefill_first']['itl_p99_interpolated_s'] * 1e3:.0f} ms, ratio "
        f"{r['prefill_first']['itl_p99_interpolated_s'] / r['mixed']['itl_p99_interpolated_s']:.1f}x"
    )
    spanned = all(n > 0 for key in ("mixed", "prefill_first") for n in r[key]["tokens_after_long_first_token"])
    print(
        "the four were still decoding when the long prompt got its first token: "
        + ("yes" if spanned else "NO")
        + f" (tokens after it, mixed {r['mixed']['tokens_after_long_first_token']}, prefill_first "
        f"{r['prefill_first']['tokens_after_long_first_token']})"
    )
    if r["outputs_identical"]:
        print("generated ids of all five conversations: identical under both policies")
    else:
        print(f"generated ids DIFFER between the policies (per conversation, same: {r['outputs_identical_each']})")


# ---- main ------------------------------------------------------------------------------------------------------------
@click.command()
@sections_options(SECTIONS)
@click.option(
    "--slots",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Capacity: the pool is this many max_seq_len slots.",
)
@click.option(
    "--conversation-tokens",
    default=1000,
    show_default=True,
    type=click.IntRange(min=CAPACITY_REPLY + 1),
    help="Capacity: tokens of each conversation, reply included.",
)
@click.option("--system-tokens", default=2000, show_default=True, type=click.IntRange(min=1), help="Shared prefix.")
@click.option(
    "--conversations", default=32, show_default=True, type=click.IntRange(min=2), help="Behind the system prompt."
)
@click.option(
    "--long-prompt-tokens", default=4000, show_default=True, type=click.IntRange(min=1), help="Decode: the long prompt."
)
def main(
    config: str,
    dtype: str,
    device: torch.device,
    out: str | None,
    only: str | None,
    threads: int | None,
    seed: int,
    slots: int,
    conversation_tokens: int,
    system_tokens: int,
    conversations: int,
    long_prompt_tokens: int,
) -> None:
    """Capacity, shared system prompt and decode latency of the paged KV pool."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    if threads:
        torch.set_num_threads(threads)
    config_args = load_config(config, dtype=dtype)
    log(f"building a random model ({config}, {dtype}, {device}, {torch.get_num_threads()} threads)")
    model = random_model(config, dtype, seed, device)
    prompts = Prompts(seed, model.args.vocab_size)
    warm_up(model, prompts)
    results = run_settings(config, dtype, device, seed)
    sections = [only] if only else list(SECTIONS)
    if "capacity" in sections:
        results["capacity"] = capacity(model, config_args, prompts, slots, conversation_tokens)
    if "shared" in sections:
        results["shared"] = shared(model, prompts, system_tokens, conversations)
    if "decode" in sections:
        results["decode"] = decode(model, prompts, long_prompt_tokens)
    report(
        results,
        {"capacity": print_capacity, "shared": print_shared, "decode": print_decode},
        started,
        load_at_start,
        out,
    )


if __name__ == "__main__":
    main()
