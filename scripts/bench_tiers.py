"""KV tiers benchmark: what the host-memory and disk tiers under the KV pool buy when conversations come back after
the pool has evicted them.

    python scripts/bench_tiers.py [--config configs/config_bench.json] [--dtype fp32] [--device cpu|cuda]
        [--out FILE.json] [--only restore|bytes|users] [--threads N] [--seed 0] [--history 2000] [--new-tokens 60]
        [--repeats 3] [--disk-conversations 4] [--disk-tokens 256] [--no-naive] [--users 64] [--turns 8]
        [--first-tokens 32-48] [--turn-tokens 8-12] [--reply-tokens 8] [--pool-conversations 8] [--work-dir DIR]
        [--warm-disk] [--quick]

The model is bench_pool.py's: a random model of the config (fp32 compute by default), world size 1 in this process
on --device (the CPU by default, or one GPU), except in section 2. Three measurements, each printed as a small table
with its ratios and goals, all figures written to --out:

1. restore: a conversation of --history tokens (prompt and a 16-token greedy reply; rounded up to whole blocks) is
   evicted from a pool that holds one such conversation by two others like it coming back, then returns with
   --new-tokens new tokens and an 8-token greedy reply. Its time to first token (median of --repeats, each with
   other new tokens) when (a) recomputed, as a pool without tiers must (its whole prompt prefilled on an empty
   cache), (b) restored from the host tier, (c) restored from the disk tier (a fresh runner and block manager over
   the folder the first engine flushed: its host tier empty, every block read from its file; the files are dropped
   from the page cache first with posix_fadvise, unless --warm-disk), side by side with (d) the new tokens prefilled
   alone on an empty cache. Goals: recompute / host >= 10x, recompute / disk >= 5x. Every variant must generate the
   same tokens, and reused / host / disk / computed tokens must be 0 / 0 / 0 / all, H / H / 0 / new,
   H / 0 / H / new, 0 / 0 / 0 / new (H the history).
2. bytes: bytes the disk tier writes per cached token. Absorb mode must write the latent once for all ranks:
   kv_lora_rank + qk_rope_head_dim elements per layer at the cache dtype (the layout's bytes_per_token), plus each
   file's header (reported apart), not that times the world size. Measured on section 1's files (world size 1, in
   this process) and on a batch job at world size 2 in real processes (`python -m torch.distributed.run --standalone
   --nproc-per-node 2 -m tp_infer.generate ... --kv-disk-path DIR --device cpu`, gloo; cuda and nccl instead when
   --device cuda finds two GPUs or more), --disk-conversations prompts whose prompt and 8 generated tokens make
   --disk-tokens tokens (whole blocks). Its checkpoint is written for world size 2 from a random model of the
   same config (each rank's shard filled with bench_common.fill_random: other weights than section 1's, the same
   cache shapes; the weights do not change a byte count). Then the same job in naive mode (each rank writes its own
   heads; --no-naive skips it) for comparison.
3. users: --users conversations of --turns turns each (a first message of --first-tokens tokens, then --turn-tokens
   per message, --reply-tokens greedy tokens each reply, eos ignored), in round robin: every conversation's turn t
   is submitted, the engine runs them (max_batch_size at once), then turn t + 1. The pool holds --pool-conversations
   of the longest conversation, so returning conversations find their history evicted. With a host tier big enough
   for all of them and without tiers: computed tokens (with tiers, exactly every message's tokens), total time and
   the ratios. Outputs must be identical between the two runs. The turns are short so that this fits in minutes on
   2 cores: without tiers every turn re-prefills its whole conversation (about 53,000 tokens at the defaults), and
   the 4,096 reply tokens take 512 decode steps of 8 rows in each run (about 0.2 s a step here, whatever the
   rows' length); longer turns (--first-tokens 100-200 --turn-tokens 25-35 --reply-tokens 16): about 20 minutes.

The default run takes about 9 minutes on 2 cores (OMP_NUM_THREADS=2; 8 min 40 s measured), most of it section 3;
--quick shrinks everything (about 1 minute). Progress goes to stderr, the tables to stdout.
"""

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import safetensors.torch
import torch
from bench_common import (
    fill_random,
    python_path,
    reply_tokens_option,
    report,
    run_settings,
    sections_options,
    turns_option,
    work_dir_option,
)
from bench_pool import BLOCK_SIZE, Prompts, random_model, warm_up, world_of_one

from tp_infer.checkpoint import shard_name
from tp_infer.config import load_config
from tp_infer.engine.engine import Engine
from tp_infer.engine.request import Turn
from tp_infer.engine.runner import ModelRunner
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.kv.disk import DiskFiles, fingerprint
from tp_infer.kv.manager import BlockManager
from tp_infer.kv.tiers import make_tiers
from tp_infer.model.attention import cache_layout
from tp_infer.model.layers import TensorParallel
from tp_infer.model.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("restore", "bytes", "users")

HISTORY_REPLY = 16  # greedy tokens of the first turn: they end the history
RETURN_REPLY = 8  # greedy tokens of the returning turn: compared between the variants
FILLERS = 2  # conversations like the measured one that come back before it, evicting it
FILLER_MESSAGE, FILLER_REPLY = 16, 1
HOST_GOAL, DISK_GOAL = 10.0, 5.0
JOB_REPLY = 8  # tokens each world-size-2 batch conversation generates
JOB_MAX_SEQ_LEN, JOB_BATCH = 512, 4
DISK_CAPACITY = 1 << 20  # blocks: never the limit here


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, ignore_eos=True)


def tierless(model: Transformer, num_blocks: int) -> Engine:
    return Engine(ModelRunner(model, world_of_one(model), num_blocks, BLOCK_SIZE))


def tiered(
    model: Transformer, num_blocks: int, host_blocks: int, disk_dir: Path | None = None, made_by: str = ""
) -> Engine:
    """An engine whose pool of num_blocks has a host tier of host_blocks under it, and with disk_dir a disk tier
    (the files found there already are indexed, as a new job would)."""
    files = DiskFiles(disk_dir, made_by, 0, shared=model.args.attn_impl == "absorb") if disk_dir else None
    runner = ModelRunner(model, world_of_one(model), num_blocks, BLOCK_SIZE, host_blocks, files)
    tiers = make_tiers(made_by, host_blocks, DISK_CAPACITY, files.scan() if files else None)
    return Engine(runner, manager=BlockManager(num_blocks, BLOCK_SIZE, tiers))


def counts(turn: Turn) -> dict:
    s = turn.stats
    return {
        "prompt": s.prompt_tokens,
        "reused": s.reused_tokens,
        "host": s.host_tokens,
        "disk": s.disk_tokens,
        "computed": s.computed_tokens,
        "ttft_s": s.ttft_s,
        "generated": list(turn.generated),
    }


def file_bytes(folder: Path) -> dict:
    """The safetensors files under folder: how many, their bytes, of which tensor data and of which header."""
    files = sorted(folder.rglob("*.safetensors"))
    total = payload = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += path.stat().st_size
        payload += sum(e - b for name, t in header.items() if name != "__metadata__" for b, e in [t["data_offsets"]])
    return {
        "files": len(files),
        "rank_files": sum(".rank" in p.name for p in files),
        "bytes": total,
        "payload_bytes": payload,
        "header_bytes": total - payload,
    }


def drop_page_cache(folder: Path) -> int:
    """Ask the kernel to forget the cached pages of the files (best effort: posix_fadvise DONTNEED after fsync)."""
    dropped = 0
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += 1
        finally:
            os.close(fd)
    return dropped


# ---- 1. restore of a returning conversation --------------------------------------------------------------------------
def restore(
    model: Transformer, prompts: Prompts, history: int, new_tokens: int, repeats: int, work: Path, warm_disk: bool
) -> dict:
    history = blocks_for(history) * BLOCK_SIZE  # the history ends on a block boundary: every block of it is whole
    prompt_len = history - HISTORY_REPLY
    pool = blocks_for(history + new_tokens + RETURN_REPLY) + 4  # one returning conversation, not two
    host = 4 * pool
    disk_dir = work / "kv-restore"
    made_by = fingerprint(model.args, work / "no-checkpoint", 1, BLOCK_SIZE)
    log(
        f"restore: a {history}-token history ({prompt_len} prompt + {HISTORY_REPLY} reply) and {FILLERS} like it, "
        f"through a pool of {pool} blocks (one of them) over a host tier of {host}; each returns with "
        f"{new_tokens} new tokens, {repeats} times"
    )
    engine = tiered(model, pool, host, disk_dir, made_by)
    started = time.perf_counter()
    histories, sessions = [], []
    for i in range(1 + FILLERS):
        session = Session(f"restore-{i}")
        turn = engine.generate(session, prompts(prompt_len), greedy(HISTORY_REPLY))
        histories.append(list(turn.tokens))
        sessions.append(session)
        log(f"  history {i}: computed {turn.stats.computed_tokens} in {time.perf_counter() - started:.1f} s")
    measured = histories[0]
    flushed = engine.flush()  # the first job ends: what the later fresh engines find on disk (histories only)
    files = file_bytes(disk_dir)
    log(f"  flushed {flushed} blocks to {disk_dir}: {files['files']} files, {files['bytes']} bytes")
    news = [prompts(new_tokens) for _ in range(repeats)]
    rows = []
    for r, new in enumerate(news):
        row = {"repeat": r + 1}
        turn = tierless(model, blocks_for(new_tokens + RETURN_REPLY) + 4).generate(
            Session(f"alone-{r}"), new, greedy(RETURN_REPLY)
        )
        row["alone"] = counts(turn)
        conversation = measured + new
        recompute = tierless(model, pool)
        turn = recompute.submit(Session(f"recompute-{r}"), conversation, [0, history], greedy(RETURN_REPLY))
        recompute.run([turn])
        row["recompute"] = counts(turn)
        fillers = []
        for i in range(1, 1 + FILLERS):  # they come back first, evicting the measured conversation
            filler = engine.submit(
                Session(f"filler-{i}-{r}"),
                histories[i] + prompts(FILLER_MESSAGE),
                [0, len(histories[i])],
                greedy(FILLER_REPLY),
            )
            engine.run([filler])  # its history stays as it was: each repeat it comes back with other new tokens
            fillers.append(counts(filler))
        row["fillers"] = fillers
        in_pool = engine.manager.tree.match(measured, len(measured)).length
        turn = engine.submit(Session(f"host-{r}"), conversation, [0, history], greedy(RETURN_REPLY))
        engine.run([turn])
        row["host"] = {**counts(turn), "history_in_pool_before": in_pool}
        dropped = 0 if warm_disk else drop_page_cache(disk_dir)
        fresh = tiered(model, pool, pool, disk_dir, made_by)  # a new job's state: nothing in the pool or host memory
        turn = fresh.submit(Session(f"disk-{r}"), conversation, [0, history], greedy(RETURN_REPLY))
        fresh.run([turn])
        row["disk"] = {**counts(turn), "files_dropped_from_page_cache": dropped}
        rows.append(row)
        log(
            "  repeat {}: ttft alone {:.0f} ms, recompute {:.0f} ms, host {:.0f} ms, disk {:.0f} ms".format(
                r + 1, *(row[k]["ttft_s"] * 1e3 for k in ("alone", "recompute", "host", "disk"))
            )
        )
    expected = {
        "recompute": (0, 0, 0, history + new_tokens),
        "host": (history, history, 0, new_tokens),
        "disk": (history, 0, history, new_tokens),
        "alone": (0, 0, 0, new_tokens),
    }
    wrong = [
        (row["repeat"], key, (row[key]["reused"], row[key]["host"], row[key]["disk"], row[key]["computed"]))
        for row in rows
        for key, want in expected.items()
        if (row[key]["reused"], row[key]["host"], row[key]["disk"], row[key]["computed"]) != want
    ]
    same = [row["recompute"]["generated"] == row["host"]["generated"] == row["disk"]["generated"] for row in rows]
    median = {key: statistics.median(row[key]["ttft_s"] for row in rows) for key in expected}
    return {
        "history_tokens": history,
        "history_prompt_tokens": prompt_len,
        "history_reply_tokens": HISTORY_REPLY,
        "new_tokens": new_tokens,
        "reply_tokens": RETURN_REPLY,
        "fillers": FILLERS,
        "pool_blocks": pool,
        "host_blocks": host,
        "repeats": repeats,
        "disk_files": files,
        "flushed_blocks": flushed,
        "disk_cold": not warm_disk,
        "ttft_median_s": median,
        "recompute_over_host": median["recompute"] / median["host"],
        "recompute_over_disk": median["recompute"] / median["disk"],
        "host_over_alone": median["host"] / median["alone"],
        "disk_over_alone": median["disk"] / median["alone"],
        "host_goal": HOST_GOAL,
        "disk_goal": DISK_GOAL,
        "host_met": median["recompute"] / median["host"] >= HOST_GOAL,
        "disk_met": median["recompute"] / median["disk"] >= DISK_GOAL,
        "expected_counts": {
            k: dict(zip(("reused", "host", "disk", "computed"), v, strict=True)) for k, v in expected.items()
        },
        "wrong_counts": wrong,
        "outputs_identical": all(same),
        "outputs_identical_each": same,
        "rows": rows,
        "run_s": time.perf_counter() - started,
    }


def print_restore(r: dict) -> None:
    print(
        f"\n1. restore: a {r['history_tokens']}-token history evicted from a {r['pool_blocks']}-block pool returns "
        f"with {r['new_tokens']} new tokens; TTFT median of {r['repeats']}"
    )
    print("| variant | reused | host | disk | computed | TTFT median (ms) | TTFT each (ms) | vs recompute |")
    print("|---|---|---|---|---|---|---|---|")
    names = {
        "recompute": "(a) recomputed (no tiers)",
        "host": "(b) restored from host memory",
        "disk": "(c) restored from disk, fresh state" + ("" if r["disk_cold"] else " (page cache warm)"),
        "alone": "(d) new tokens alone, empty cache",
    }
    med = r["ttft_median_s"]
    for key, name in names.items():
        first = r["rows"][0][key]
        each = ", ".join(f"{row[key]['ttft_s'] * 1e3:.0f}" for row in r["rows"])
        print(
            f"| {name} | {first['reused']} | {first['host']} | {first['disk']} | {first['computed']} "
            f"| {med[key] * 1e3:.0f} | {each} | {med['recompute'] / med[key]:.1f}x |"
        )
    print(
        f"recompute / host: {r['recompute_over_host']:.1f}x, goal >= {r['host_goal']:.0f}x: "
        f"{'met' if r['host_met'] else 'MISSED'}; recompute / disk: {r['recompute_over_disk']:.1f}x, goal >= "
        f"{r['disk_goal']:.0f}x: {'met' if r['disk_met'] else 'MISSED'}"
    )
    print(
        f"host / alone: {r['host_over_alone']:.2f}x, disk / alone: {r['disk_over_alone']:.2f}x (what restoring "
        f"{r['history_tokens']} tokens adds to prefilling {r['new_tokens']})"
    )
    in_pool = [row["host"]["history_in_pool_before"] for row in r["rows"]]
    print(
        f"history tokens still in the pool when it returned (host variant): {in_pool}; disk variant: "
        f"{r['disk_files']['files']} files from the first engine's flush of {r['flushed_blocks']} blocks"
        + (", dropped from the page cache before each repeat" if r["disk_cold"] else ", page cache left warm")
    )
    if r["wrong_counts"]:
        print(f"WRONG counts (repeat, variant, (reused, host, disk, computed)): {r['wrong_counts']}")
    else:
        print("reused / host / disk / computed tokens: as expected in every repeat and variant")
    if r["outputs_identical"]:
        print("generated ids: identical in (a), (b) and (c), every repeat")
    else:
        print(f"generated ids DIFFER between the variants (per repeat, same: {r['outputs_identical_each']})")


# ---- 2. bytes per token on disk --------------------------------------------------------------------------------------
def write_checkpoint(config: str, seed: int, world_size: int, out: Path) -> None:
    """A checkpoint for world_size ranks: the config, and each rank's shard of a random model (bf16 weights)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(config, out / "config.json")
    args = load_config(config, dtype="bf16")
    for rank in range(world_size):
        model = Transformer(args, TensorParallel(rank, world_size))
        fill_random(model, seed)
        tensors = {name: t.clone() for name, t in model.state_dict().items()}  # experts are views of stacks
        safetensors.torch.save_file(tensors, out / shard_name(rank, world_size), {"world_size": str(world_size)})
        del model, tensors


def batch_job(ckpt: Path, work: Path, name: str, prompts: list[list[int]], dtype: str, impl: str, device: str) -> dict:
    """The batch job at world size 2 under torchrun on device (cpu or cuda), with a disk tier: its records, files and
    time."""
    folder = work / f"kv-{name}"
    (work / f"{name}.in").write_text(
        "".join(json.dumps({"id": i, "prompt_token_ids": p}) + "\n" for i, p in enumerate(prompts))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tp_infer.generate", "--ckpt-path", str(ckpt), "--input-file", str(work / f"{name}.in")]
    cmd += ["--output-file", str(work / f"{name}.out"), "--kv-disk-path", str(folder), "--device", device]
    cmd += ["--dtype", dtype, "--attn-impl", impl, "--max-new-tokens", str(JOB_REPLY), "--ignore-eos"]
    cmd += ["--max-seq-len", str(JOB_MAX_SEQ_LEN), "--max-batch-size", str(JOB_BATCH)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path(REPO)}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise click.ClickException(f"the world-size-2 {impl} job failed ({done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (work / f"{name}.out").read_text().splitlines()]
    saved = [line for line in done.stderr.splitlines() if "blocks saved for later jobs" in line]
    return {
        "command": " ".join(cmd),
        "device": device,
        "run_s": seconds,
        "turns": [r["turns"][0] for r in sorted(records, key=lambda r: r["id"])],
        "errors": [r["error"] for r in records if r["error"]],
        "saved_line": saved[-1] if saved else None,
        "files": file_bytes(folder),
    }


def disk_bytes(
    config: str,
    dtype: str,
    device: torch.device,
    seed: int,
    conversations: int,
    tokens: int,
    naive: bool,
    work: Path,
    ws1: dict | None,
) -> dict:
    tokens = max(blocks_for(tokens), blocks_for(JOB_REPLY + 1)) * BLOCK_SIZE
    args = load_config(config, dtype=dtype, attn_impl="absorb")
    per_token = cache_layout(args, 1).bytes_per_token
    naive_per_rank = cache_layout(args.with_options(attn_impl="naive"), 2).bytes_per_token
    ckpt = work / "ckpt-mp2"
    started = time.perf_counter()
    log(f"bytes: writing a world-size-2 checkpoint of a random model ({config}) to {ckpt}")
    write_checkpoint(config, seed, 2, ckpt)
    build_s = time.perf_counter() - started
    prompts = Prompts(seed + 1, args.vocab_size)
    lines = [prompts(tokens - JOB_REPLY) for _ in range(conversations)]
    cached = conversations * tokens  # prompt and reply, the last token too: whole blocks, no prefix shared
    job_device = device.type if torch.cuda.device_count() >= 2 else "cpu"  # a GPU per rank, or the CPU
    jobs = {}
    for impl in ("absorb", "naive") if naive else ("absorb",):
        log(
            f"  world size 2 on {job_device}, {impl}: {conversations} prompts of {tokens - JOB_REPLY} tokens + "
            f"{JOB_REPLY} generated"
        )
        jobs[impl] = batch_job(ckpt, work, f"job-{impl}", lines, dtype, impl, job_device)
        f = jobs[impl]["files"]
        log(f"  {impl}: {f['files']} files, {f['bytes']} bytes in {jobs[impl]['run_s']:.0f} s")
    for job in jobs.values():
        f = job["files"]
        job["bytes_per_token"] = f["bytes"] / cached
        job["payload_per_token"] = f["payload_bytes"] / cached
        job["header_bytes_per_file"] = f["header_bytes"] / f["files"] if f["files"] else None
        job["computed"] = [t["computed_tokens"] for t in job["turns"]]
    absorb = jobs["absorb"]
    out = {
        "world_size": 2,
        "conversations": conversations,
        "conversation_tokens": tokens,
        "cached_tokens": cached,
        "cached_blocks": cached // BLOCK_SIZE,
        "cache_dtype": args.kv_cache_dtype if args.kv_cache_dtype != "auto" else dtype,
        "latent_values_per_layer": args.kv_lora_rank + args.qk_rope_head_dim,
        "layers": args.n_layers,
        "kv_bytes_per_token_ws1": per_token,
        "if_per_rank": 2 * per_token,
        "naive_formula_per_token_all_ranks": 2 * naive_per_rank,
        "checkpoint_build_s": build_s,
        "jobs": jobs,
        "absorb_payload_equal_latent": absorb["payload_per_token"] == per_token,
        "absorb_files_once": absorb["files"]["files"] == cached // BLOCK_SIZE and absorb["files"]["rank_files"] == 0,
        "run_s": time.perf_counter() - started,
    }
    if ws1 is not None:  # section 1's folder: world size 1, in this process
        out["ws1"] = {
            **ws1,
            "payload_per_token": ws1["payload_bytes"] / (ws1["files"] * BLOCK_SIZE),
            "bytes_per_token": ws1["bytes"] / (ws1["files"] * BLOCK_SIZE),
        }
    return out


def print_bytes(r: dict) -> None:
    print(
        f"\n2. bytes per token on disk: {r['conversations']} conversations of {r['conversation_tokens']} tokens "
        f"({r['cached_tokens']} tokens, {r['cached_blocks']} blocks), {r['layers']} layers x "
        f"{r['latent_values_per_layer']} latent values at {r['cache_dtype']}"
    )
    print("| run | files | payload bytes/token | header bytes/file | total bytes/token | formula bytes/token |")
    print("|---|---|---|---|---|---|")
    if "ws1" in r:
        w = r["ws1"]
        print(
            f"| absorb, world size 1 (section 1's files) | {w['files']} | {w['payload_per_token']:.0f} "
            f"| {w['header_bytes'] / w['files']:.0f} | {w['bytes_per_token']:.0f} | {r['kv_bytes_per_token_ws1']} |"
        )
    formula = {"absorb": r["kv_bytes_per_token_ws1"], "naive": r["naive_formula_per_token_all_ranks"]}
    for impl, job in r["jobs"].items():
        f = job["files"]
        backend = "nccl" if job["device"] == "cuda" else "gloo"
        print(
            f"| {impl}, world size 2 (torchrun, {backend}) | {f['files']} ({f['rank_files']} per-rank) "
            f"| {job['payload_per_token']:.0f} | {job['header_bytes_per_file']:.0f} | {job['bytes_per_token']:.0f} "
            f"| {formula[impl]} |"
        )
    a = r["jobs"]["absorb"]
    verdict = "equal" if r["absorb_payload_equal_latent"] else "DIFFERENT"
    print(
        f"absorb at world size 2: {a['payload_per_token']:.0f} payload bytes/token vs the layout's bytes_per_token = "
        f"{r['kv_bytes_per_token_ws1']}: {verdict}; x world size would be {r['if_per_rank']}; "
        f"header overhead {a['files']['header_bytes'] / r['cached_tokens']:.1f} bytes/token "
        f"({a['header_bytes_per_file']:.0f} per {BLOCK_SIZE}-token file)"
    )
    print(
        f"absorb files: {a['files']['files']} for {r['cached_blocks']} blocks, {a['files']['rank_files']} per-rank: "
        + ("one file per block for both ranks" if r["absorb_files_once"] else "NOT one file per block")
        + f"; {a['saved_line']}"
    )
    if "naive" in r["jobs"]:
        n = r["jobs"]["naive"]
        print(
            f"naive at world size 2: {n['payload_per_token']:.0f} payload bytes/token on disk (both ranks' heads), "
            f"{n['payload_per_token'] / a['payload_per_token']:.1f}x absorb's"
        )
    for impl, job in r["jobs"].items():
        print(f"{impl} job: {job['run_s']:.0f} s, computed tokens {job['computed']}, errors {job['errors'] or 'none'}")


# ---- 3. many users ---------------------------------------------------------------------------------------------------
def users_run(model: Transformer, messages: list[list[list[int]]], reply: int, pool: int, host: int) -> dict:
    engine = tiered(model, pool, host) if host else tierless(model, pool)
    sessions = [Session(f"user-{u}") for u in range(len(messages))]
    turns: list[list[Turn]] = [[] for _ in messages]
    started = time.perf_counter()
    for t in range(len(messages[0])):
        batch = [engine.append_turn(s, m[t], greedy(reply)) for s, m in zip(sessions, messages, strict=True)]
        engine.run(batch)
        for u, turn in enumerate(batch):
            turns[u].append(turn)
        log(
            f"  {'host tier' if host else 'no tiers'}: turn {t + 1}/{len(messages[0])} done at "
            f"{time.perf_counter() - started:.0f} s, computed {engine.totals.computed_tokens} in all"
        )
    run_s = time.perf_counter() - started
    usage = engine.cache_usage()
    totals = engine.totals
    return {
        "tiers": bool(host),
        "pool_blocks": pool,
        "host_blocks": host,
        "run_s": run_s,
        "turns": totals.turns,
        "prompt_tokens": totals.prompt_tokens,
        "reused_tokens": totals.reused_tokens,
        "host_tokens": totals.host_tokens,
        "computed_tokens": totals.computed_tokens,
        "generated_tokens": totals.generated_tokens,
        "recomputed_tokens": sum(t.stats.recomputed_tokens for ts in turns for t in ts),
        "evicted_blocks": usage.evicted_blocks,
        "preemptions": usage.preemptions,
        "restored_blocks": engine.manager.restored_blocks,
        "generated": [[t.generated for t in ts] for ts in turns],
    }


def many_users(
    model: Transformer,
    prompts: Prompts,
    users: int,
    turns: int,
    first: tuple[int, int],
    per_turn: tuple[int, int],
    reply: int,
    pool_conversations: int,
) -> dict:
    rng = prompts.rng
    messages = [[prompts(rng.randint(*(first if t == 0 else per_turn))) for t in range(turns)] for _ in range(users)]
    lengths = [sum(map(len, m)) + turns * reply for m in messages]
    pool = pool_conversations * blocks_for(max(lengths))
    host = 2 * sum(blocks_for(n) for n in lengths)
    log(
        f"users: {users} conversations of {turns} turns in round robin (longest {max(lengths)} tokens, "
        f"{sum(lengths)} in all), pool of {pool} blocks ({pool_conversations} of the longest); host tier {host} "
        "blocks, then no tiers"
    )
    with_tiers = users_run(model, messages, reply, pool, host)
    without = users_run(model, messages, reply, pool, 0)
    same = [a == b for a, b in zip(with_tiers["generated"], without["generated"], strict=True)]
    new_tokens = sum(map(len, (m for ms in messages for m in ms)))
    return {
        "users": users,
        "turns_per_user": turns,
        "first_tokens": list(first),
        "turn_tokens": list(per_turn),
        "reply_tokens": reply,
        "pool_conversations": pool_conversations,
        "conversation_tokens_max": max(lengths),
        "conversation_tokens_mean": statistics.mean(lengths),
        "message_tokens": new_tokens,
        "tiers": with_tiers,
        "no_tiers": without,
        "computed_ratio": without["computed_tokens"] / with_tiers["computed_tokens"],
        "time_ratio": without["run_s"] / with_tiers["run_s"],
        "tiers_compute_only_messages": with_tiers["computed_tokens"] == new_tokens,
        "outputs_identical": all(same),
        "conversations_differing": [u for u, s in enumerate(same) if not s],
    }


def print_users(r: dict) -> None:
    t = r["tiers"]
    print(
        f"\n3. many users: {r['users']} conversations x {r['turns_per_user']} turns in round robin (first message "
        f"{r['first_tokens'][0]}-{r['first_tokens'][1]} tokens, then {r['turn_tokens'][0]}-{r['turn_tokens'][1]}, "
        f"replies {r['reply_tokens']}; up to {r['conversation_tokens_max']} tokens each), pool of {t['pool_blocks']} "
        f"blocks = {r['pool_conversations']} of the longest"
    )
    print("| run | computed tokens | reused | from host | evicted blocks | preemptions | total time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in (("host tier", r["tiers"]), ("no tiers", r["no_tiers"])):
        print(
            f"| {name} | {run['computed_tokens']} | {run['reused_tokens']} | {run['host_tokens']} "
            f"| {run['evicted_blocks']} | {run['preemptions']} | {run['run_s']:.1f} |"
        )
    print(
        f"no tiers / host tier: computed tokens {r['computed_ratio']:.1f}x, total time {r['time_ratio']:.1f}x "
        f"({t['generated_tokens']} tokens generated in each run)"
    )
    verdict = "equal" if r["tiers_compute_only_messages"] else "DIFFERENT"
    print(f"host tier computed {t['computed_tokens']} vs the messages' own {r['message_tokens']} tokens: {verdict}")
    if r["outputs_identical"]:
        print("generated ids: identical in both runs, every conversation and turn")
    else:
        print(f"generated ids DIFFER between the runs in conversations {r['conversations_differing']}")


# ---- main ------------------------------------------------------------------------------------------------------------
def token_range(ctx, param, value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split("-")) if "-" in value else (int(value), int(value))
    except ValueError:
        raise click.BadParameter("LO-HI, e.g. 40-60") from None
    if not 1 <= lo <= hi:
        raise click.BadParameter("LO-HI with 1 <= LO <= HI")
    return lo, hi


QUICK = {
    "history": 400,
    "new_tokens": 30,
    "repeats": 2,
    "disk_conversations": 2,
    "disk_tokens": 64,
    "users": 12,
    "turns": 3,
    "first_tokens": (20, 30),
    "turn_tokens": (6, 10),
    "reply_tokens": 4,
    "pool_conversations": 3,
}


@click.command()
@sections_options(SECTIONS)
@click.option("--history", default=2000, show_default=True, type=click.IntRange(min=32), help="Restore: history.")
@click.option("--new-tokens", default=60, show_default=True, type=click.IntRange(min=1), help="Restore: new tokens.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Restore: repetitions.")
@click.option(
    "--warm-disk", is_flag=True, help="Restore: leave the files in the page cache (default: dropped, best effort)."
)
@click.option("--disk-conversations", default=4, show_default=True, type=click.IntRange(min=1), help="Bytes.")
@click.option("--disk-tokens", default=256, show_default=True, type=click.IntRange(min=16), help="Bytes: tokens each.")
@click.option("--no-naive", is_flag=True, help="Bytes: skip the naive-mode job.")
@click.option("--users", default=64, show_default=True, type=click.IntRange(min=1), help="Users: conversations.")
@turns_option(8, "Users: turns each.")
@click.option("--first-tokens", default="32-48", show_default=True, callback=token_range, help="Users: LO-HI.")
@click.option("--turn-tokens", default="8-12", show_default=True, callback=token_range, help="Users: LO-HI.")
@reply_tokens_option(8, "Users: per reply.", fewest=1)
@click.option(
    "--pool-conversations", default=8, show_default=True, type=click.IntRange(min=1), help="Users: pool size."
)
@work_dir_option("For the files (default: a temporary folder).")
@click.option("--quick", is_flag=True, help="Small sizes everywhere (a test of the script: about 1 minute).")
def main(
    config: str,
    dtype: str,
    device: torch.device,
    out: str | None,
    only: str | None,
    threads: int | None,
    seed: int,
    **sizes,
) -> None:
    """Restore time, bytes on disk per token and many users of the KV tiers."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    work_dir, quick = sizes.pop("work_dir"), sizes.pop("quick")
    warm_disk, naive = sizes.pop("warm_disk"), not sizes.pop("no_naive")
    if quick:
        sizes.update(QUICK)
    if threads:
        torch.set_num_threads(threads)
    sections = [only] if only else list(SECTIONS)
    results = run_settings(config, dtype, device, seed)
    results["sizes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}
    results["quick"] = quick
    work = Path(tempfile.mkdtemp(prefix="bench_tiers-", dir=work_dir))
    try:
        model = prompts = None
        if "restore" in sections or "users" in sections:
            log(f"building a random model ({config}, {dtype}, {device}, {torch.get_num_threads()} threads)")
            model = random_model(config, dtype, seed, device)
            prompts = Prompts(seed, model.args.vocab_size)
            warm_up(model, prompts)
        if "restore" in sections:
            results["restore"] = restore(
                model, prompts, sizes["history"], sizes["new_tokens"], sizes["repeats"], work, warm_disk
            )
        if "bytes" in sections:
            ws1 = results["restore"]["disk_files"] if "restore" in results else None
            results["bytes"] = disk_bytes(
                config, dtype, device, seed, sizes["disk_conversations"], sizes["disk_tokens"], naive, work, ws1
            )
        if "users" in sections:
            results["users"] = many_users(
                model,
                prompts,
                sizes["users"],
                sizes["turns"],
                sizes["first_tokens"],
                sizes["turn_tokens"],
                sizes["reply_tokens"],
                sizes["pool_conversations"],
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, {"restore": print_restore, "bytes": print_bytes, "users": print_users}, started, load_at_start, out)


if __name__ == "__main__":
    main()
