"""Serving benchmark: simulated chat users against the OpenAI-compatible server, history reuse on and off; or, with
--replicas, one replica against two behind the gateway (smg), routed round robin or by conversation.

python scripts/bench_serving.py --users 8,16 --out serving.json --plot serving.png
python scripts/bench_serving.py --replicas --model demo --out replicas.json
    [--model bench|demo] [--rounds N] [--turns 8] [--max-new-tokens N] [--system-tokens N] [--user-tokens LO-HI]
    [--think 1.0] [--arrival S] [--max-batch-size 32] [--max-num-batched-tokens 512] [--max-seq-len N]
    [--server-threads N] [--device cpu|cuda] [--attn-impl absorb|naive] [--ckpt-path CONVERTED] [--seed 0]
    [--work-dir DIR]

The model (--model; --ckpt-path names an already converted checkpoint instead):
- bench (the default): random weights in the shape of configs/config_bench.json (DeepSeek-V3-shaped: hidden 1024,
  8 layers, 16 heads, MoE with 16 routed experts; scaled as bench_multiturn.py's, so activations stay O(1) and routing
  matters) with the demo model's tokenizer and chat template, the vocabulary rounded up from the tokenizer's to a
  multiple of 64, saved as a Hugging Face folder and converted for one rank (tp_infer.convert). Its text is random;
  replies are a fixed number of tokens anyway. Workload: shared-nothing chats as real traffic has them: each user
  has its own system prompt of ~150 tokens (demo-chat text opening with a word whose first tokens no other user's
  prompt starts with, so users share nothing beyond the template's leading token), user messages of 60-100 tokens,
  32-token replies: prompts of ~240 tokens at turn 1, ~1,070 at turn 8. Without reuse every turn re-prefills that
  history; with it only the ~120 new tokens. One round; users arrive at seeded times within 10 s.
- demo: the shipped demo model (demo/model, hidden 192, 4 layers, trained, its own tokenizer and chat template),
  and its short chats: one demo_data.py user message per turn, no system prompt (every conversation differs from
  all others from its first message), 16-token replies, three rounds, no arrival spread. Histories stay ~200 tokens,
  which this model re-prefills in next to no time: reuse hardly matters there.
Two servers are started (`python -m tp_infer.serve`, world size 1, --device cpu (or cuda: both on one GPU), --dtype
fp32, --ignore-eos and a fixed --max-new-tokens, so every reply has the same length; greedy), one with history reuse
and one with `--no-reuse`, each warmed up with one request. An idle server only waits on its queue, so both stay up
and their runs interleave: --rounds times, for each N of --users, N users chat with one server, then the same N users
(the same conversations, arrival and think times) with the other, the order alternating. Each user is a thread with
its own `openai` client (max_retries=0) holding a --turns-turn conversation (seeded). Every turn sends the whole
history, as chat apps do, streaming with usage included; a user arrives at a seeded uniform time within --arrival
seconds, and before each turn, the first one too, thinks for a seeded uniform 0.2-1.0 s times --think. The rounds'
figures are pooled per configuration.

Measured on the client: time to first token (request sent -> first non-empty content delta), inter-token latency
(gaps between content deltas; a delta may carry more than one token when the server holds back an incomplete
character), time per output token ((last delta - first delta) / (completion tokens - 1)), output tokens/s and
requests/s over the runs' wall time (arrival and think times included: a closed-loop workload), the cache hit rate
(sum of usage.prompt_tokens_details.cached_tokens / sum of prompt_tokens) and the mean time to first token of each
turn number. Checked: every reply has --max-new-tokens completion tokens; with reuse, from turn 2 on cached_tokens
covers the whole history (the previous turn's prompt and reply tokens), never more; without reuse it is 0; the
server's /metrics counters agree with the usage the client saw; greedy replies are the same with reuse on and off;
each server exits by itself on SIGTERM. Goals: with reuse, TTFT of the last turn / TTFT of turn 1 <= 1.5 (for every
users count), and p99 TTFT no-reuse / reuse at 16 users >= 5. Progress goes to stderr; the settings, tables,
checks, goals, elapsed time (per phase and run) and the load average (before, sampled every 10 s during, after) to
stdout; --out gets every figure as JSON, --plot a PNG of mean TTFT per turn (reuse on: solid, off: dashed; one
colour per users count). Everything runs on this machine: latencies include whatever else it is running, so compare
figures from one run, on an otherwise idle machine (the server's --server-threads threads stall whenever another
job takes a core). The default run (bench, users 8,16) takes 10-11 minutes on 2 idle cores, most of it the no-reuse
runs. Replies of one length and short think times put the users in step: by the last turns their requests arrive
within a second of each other and are prefilled in the same steps, so with reuse TTFT still grows over the turns
(each turn waits for the whole group's new tokens, which attend over growing histories) although only the new tokens
are computed (see per_request in --out).

--replicas (issue 31's benchmark): every user's conversation opens with one shared system prompt (--system-tokens,
default 400) and goes on with user messages of --user-tokens (default 30-50) and 16-token replies (demo model): ~900
tokens by turn 8 of --turns. Two replicas are started (each `python -m tp_infer.serve`, world size 1, reuse on, its
own --server-threads), then two gateways in front of both (`smg launch`, as launch/replicas.sh starts it): one with
--policy round_robin, one with consistent_hashing, where each user sends its conversation's id in the
X-SMG-Routing-Key header (the affinity the README's "Many replicas" ships). Three configurations, for each round and
users count (default 32), the order rotating: "1 replica" (the users talk straight to replica 0), "2, round robin"
and "2, affinity" (through the gateway); before each, every replica's cache is emptied (POST /flush_cache), so each
starts from nothing cached. Figures as above, side by side: cache hit rate, how many later turns found their whole
history cached, p50/p99 TTFT, throughput; then the ratios against the goals (affinity's hit rate within 2 points of
one replica's; p99 TTFT round robin / affinity >= 2) and checks (no errors, /metrics agree with the usage seen,
replies the same as one replica's: greedy, they differ only where a turn lands on a replica that did not generate the
history's replies and re-encodes their text to other ids). Two replicas on two cores share them with the gateway, the
users' threads and whatever else runs: compare the configurations of one run, and read the load average printed.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx
import openai
from bench_common import attn_impl_option, device_option, python_path
from demo_data import ANIMALS, CITIES, COLOURS, JOBS, NAMES, THINGS, THINGS_LIKED, make_conversation

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "demo" / "model"
BENCH_CONFIG = REPO / "configs" / "config_bench.json"
VOCAB_MULTIPLE = 64  # the bench model's vocabulary is the tokenizer's rounded up: world sizes dividing 64 divide it
# --model's defaults of the options left unset
MODEL_DEFAULTS = {
    "bench": {
        "rounds": 1, "max_new_tokens": 32, "system_tokens": 150, "user_tokens": (60, 100), "arrival": 10.0,
        "max_seq_len": 2048, "server_threads": 2,
    },
    "demo": {
        "rounds": 3, "max_new_tokens": 16, "system_tokens": 0, "user_tokens": (0, 0), "arrival": 0.0,
        "max_seq_len": 1024, "server_threads": 1,
    },
}  # fmt: skip
# --replicas' defaults over --model's: conversations that reach ~900 tokens by turn 8 within the demo model's 1024
REPLICAS_DEFAULTS = {"rounds": 3, "system_tokens": 400, "user_tokens": (30, 50), "arrival": 5.0}
TTFT_TURN_GOAL = 1.5  # with reuse: TTFT of the last turn / TTFT of turn 1 at most this
P99_RATIO_GOAL = 5.0  # p99 TTFT no-reuse / reuse at P99_RATIO_USERS users at least this
P99_RATIO_USERS = 16
THINK_RANGE = (0.2, 1.0)  # seconds before each turn, times --think
COUNTERS = ("tp_infer_prompt_tokens", "tp_infer_cached_tokens", "tp_infer_generated_tokens")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---- conversations ---------------------------------------------------------------------------------------------------
@dataclass
class UserScript:
    """One simulated user: an optional system prompt and the user messages of its turns."""

    system: str | None
    messages: list[str]


def demo_sentences(rng: random.Random) -> Iterator[str]:
    """User messages of demo conversations (facts, questions, small talk), endlessly."""
    while True:
        for turn in make_conversation(rng)["turns"]:
            yield turn["user"]


def fill_to(text: str, sentences: Iterator[str], target: int, count: Callable[[str], int]) -> str:
    """`text`, then sentences appended until it holds at least `target` tokens."""
    while count(text) < target:
        sentence = next(sentences)
        text = f"{text} {sentence}" if text else sentence
    return text


def openings(total: int, rng: random.Random, encode: Callable[[str], list[int]]) -> list[str]:
    """`total` distinct first words for system prompts, chosen so that their tokens part as early as they can: a
    word whose first token no other opening starts with while there are such words, then the first two, and so on."""
    pool = [*NAMES, *CITIES, *(w.capitalize() for w in (*THINGS, *COLOURS, *JOBS, *ANIMALS, *THINGS_LIKED))]
    pool = list(dict.fromkeys(pool))
    rng.shuffle(pool)
    ids = {word: tuple(encode(f"{word} is the user")) for word in pool}
    used: set[tuple[int, ...]] = set()
    chosen = []
    for _ in range(total):
        if not pool:
            raise click.ClickException(f"more than {len(chosen)} users: not enough distinct opening words")
        shared = {w: next((k for k in range(len(ids[w])) if ids[w][: k + 1] not in used), len(ids[w])) for w in pool}
        word = min(pool, key=shared.__getitem__)  # the first of the least shared, in the shuffled order
        pool.remove(word)
        used.update(ids[word][: k + 1] for k in range(len(ids[word])))
        chosen.append(word)
    return chosen


def user_scripts(
    counts: list[int],
    rounds: int,
    turns: int,
    seed: int,
    system_tokens: int,
    user_tokens: tuple[int, int],
    encode: Callable[[str], list[int]],
) -> dict[tuple[int, int], list[UserScript]]:
    """For each (round, users count), one script per user. No conversation of the whole run begins like another,
    so no user finds another's history in the cache: with a system prompt, each user's own (of about
    `system_tokens` tokens) begins with its own word; without one, all first messages differ. User messages are
    single demo-conversation messages, or (user_tokens (lo, hi), hi > 0) such messages chained to a seeded
    lo..hi tokens each."""
    rng = random.Random(seed)

    def tokens(text: str) -> int:
        return len(encode(text))

    words = iter(openings(rounds * sum(counts), rng, encode)) if system_tokens else None
    taken: set[str] = set()
    scripts: dict[tuple[int, int], list[UserScript]] = {}
    for k in range(rounds):
        for n in counts:
            chosen = scripts[k, n] = []
            while len(chosen) < n:
                sentences = demo_sentences(rng)
                system = None
                if words is not None:
                    word = next(words)
                    head = f"{word} is the user you are helping today. What {word} told you in earlier chats:"
                    system = fill_to(head, sentences, system_tokens, tokens)
                if user_tokens[1]:
                    messages = [fill_to("", sentences, rng.randint(*user_tokens), tokens) for _ in range(turns)]
                else:
                    messages = []
                    while len(messages) < turns:  # demo conversations run 5-15 turns: chain draws for long --turns
                        messages += [t["user"] for t in make_conversation(rng)["turns"]]
                    messages = messages[:turns]
                    if system is None and messages[0] in taken:
                        continue
                    taken.add(messages[0])
                chosen.append(UserScript(system, messages))
    return scripts


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def shared_prefix(scripts: dict[tuple[int, int], list[UserScript]], encode: Callable[[str], list[int]]) -> int:
    """The most leading tokens any two users' first turns share (system prompt, else first message), the chat
    template's own tokens left out."""
    firsts = sorted(
        tuple(encode(u.system if u.system is not None else u.messages[0])) for v in scripts.values() for u in v
    )
    return max((common_prefix(a, b) for a, b in itertools.pairwise(firsts)), default=0)  # sorted: neighbours suffice


# ---- the server ------------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, ckpt: Path, reuse: bool, options: list[str], threads: int, log_dir: Path):
        self.reuse, self.port = reuse, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = ckpt.resolve().name
        cmd = [sys.executable, "-m", "tp_infer.serve", "--ckpt-path", str(ckpt), "--port", str(self.port), *options]
        if not reuse:
            cmd.append("--no-reuse")
        self.command = cmd
        self.log_path = log_dir / f"serve-{'reuse' if reuse else 'no-reuse'}-{self.port}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": python_path(REPO)}
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = started + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise click.ClickException(f"the server did not come up ({' '.join(cmd)}):\n{self.output()[-3000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, user: int | None = None) -> openai.OpenAI:
        """A client of its own for `user` (a replica needs no routing key)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)

    def flush(self) -> dict:
        """Empty its cache (SGLang's /flush_cache): every configuration starts from nothing cached."""
        answer = httpx.post(f"{self.url}/flush_cache", timeout=60)
        answer.raise_for_status()
        return answer.json()

    def counters(self) -> dict[str, float]:
        """The server's counters (name without _total -> value), gauges too."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line.startswith("tp_infer_") and "{" not in line:
                name, value = line.split()[:2]
                out[name.removesuffix("_total")] = float(value)
        return out

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self, limit: float = 60) -> dict:
        """SIGTERM, then wait for the server to exit by itself; killed (and reported) if it does not."""
        if self.proc.poll() is not None:
            self.log.close()
            return {"exited_before_stop": True, "exit_code": self.proc.returncode, "exit_s": 0.0, "killed": False}
        sent = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=limit)
            killed = False
        except subprocess.TimeoutExpired:
            self.kill()
            code, killed = self.proc.returncode, True
        exit_s = time.monotonic() - sent
        if not self.log.closed:
            self.log.close()
        return {"exited_before_stop": False, "exit_code": code, "exit_s": round(exit_s, 2), "killed": killed}


# ---- the users -------------------------------------------------------------------------------------------------------
@dataclass
class TurnRecord:
    round: int
    user: int
    turn: int  # 1-based
    start: float
    ttft: float = math.nan
    e2e: float = math.nan
    gaps: list[float] = field(default_factory=list)
    tpot: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    reply: str = ""
    error: str | None = None


def chat_turn(client: openai.OpenAI, model: str, messages: list[dict], record: TurnRecord) -> None:
    t0 = time.perf_counter()
    first = last = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                if first is None:
                    first = now
                else:
                    record.gaps.append(now - last)
                last = now
                parts.append(choice.delta.content)
            if choice.finish_reason:
                record.finish_reason = choice.finish_reason
    record.e2e = time.perf_counter() - t0
    record.reply = "".join(parts)
    if first is None:
        raise RuntimeError("the stream carried no content")
    record.ttft = first - t0
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    details = usage.prompt_tokens_details
    record.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
    if record.completion_tokens > 1:
        record.tpot = (last - first) / (record.completion_tokens - 1)


def run_users(
    server: Server, scripts: list[UserScript], think: float, arrival: float, seed: int, round_: int
) -> tuple[list[TurnRecord], float]:
    """Every user's conversation at once (each arriving within `arrival` s); returns every turn's record and the
    wall time."""
    n = len(scripts)
    go = threading.Barrier(n + 1)

    def user(i: int) -> list[TurnRecord]:
        rng = random.Random(f"{seed}-{round_}-{n}-{i}")  # arrival and think times: the same on both servers
        client = server.client(i)
        system = scripts[i].system
        messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        records = []
        go.wait()
        try:
            time.sleep(rng.uniform(0, arrival))
            for t, text in enumerate(scripts[i].messages, start=1):
                time.sleep(rng.uniform(*THINK_RANGE) * think)
                messages.append({"role": "user", "content": text})
                record = TurnRecord(round_, i, t, time.perf_counter())
                records.append(record)
                try:
                    chat_turn(client, server.model, messages, record)
                except Exception as e:  # the conversation cannot go on without its reply
                    record.error = f"{type(e).__name__}: {e}"[:500]
                    break
                messages.append({"role": "assistant", "content": record.reply})
        finally:
            client.close()
        return records

    pool = ThreadPoolExecutor(n)
    try:
        futures = [pool.submit(user, i) for i in range(n)]
        go.wait()
        started = time.perf_counter()
        records = [r for f in futures for r in f.result()]
    except BaseException:  # interrupted (SIGTERM, ^C): leave at once; stopping the servers ends the users' requests
        go.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return records, time.perf_counter() - started


def request_row(r: TurnRecord, round_start: float) -> dict:
    """One request's figures (times in ms; start: since the round's first request was sent)."""
    return {
        "round": r.round, "user": r.user, "turn": r.turn, "start_ms": (r.start - round_start) * 1e3,
        "ttft_ms": r.ttft * 1e3, "e2e_ms": r.e2e * 1e3, "tpot_ms": r.tpot * 1e3, "deltas": len(r.gaps) + 1,
        "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "completion_tokens": r.completion_tokens,
        "error": r.error,
    }  # fmt: skip


def summarize(records: list[TurnRecord], wall: float, turns: int, max_new_tokens: int, reuse: bool) -> dict:
    """The figures of one configuration over all its rounds (wall: the rounds' wall times summed)."""
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    tpot = [r.tpot for r in ok if not math.isnan(r.tpot)]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    by_user: dict[tuple[int, int], dict[int, TurnRecord]] = {}
    for r in ok:
        by_user.setdefault((r.round, r.user), {})[r.turn] = r
    # cache checks: turn t >= 2 should find the previous turn's prompt and reply (reuse) or nothing (no reuse)
    history_covered = history_missed = beyond_history = nonzero_without_reuse = 0
    missed_examples = []
    for user, mine in by_user.items():
        for t, r in mine.items():
            if not reuse:
                nonzero_without_reuse += r.cached_tokens > 0
                continue
            before = mine.get(t - 1)
            if before is None:
                continue
            history = before.prompt_tokens + before.completion_tokens
            if r.cached_tokens >= history:
                history_covered += 1
                beyond_history += r.cached_tokens > history
            else:
                history_missed += 1
                if len(missed_examples) < 5:
                    missed_examples.append(
                        {"round": user[0], "user": user[1], "turn": t, "history": history, "cached": r.cached_tokens}
                    )
    per_turn = [mean([r.ttft for r in ok if r.turn == t]) for t in range(1, turns + 1)]
    round_start: dict[int, float] = {}
    for r in records:
        round_start[r.round] = min(r.start, round_start.get(r.round, math.inf))
    prompt_by_turn = [mean([r.prompt_tokens for r in ok if r.turn == t]) for t in range(1, turns + 1)]
    return {
        "reuse": reuse,
        "users": len({r.user for r in records}),
        "rounds": len({r.round for r in records}),
        "requests": len(ok),
        "errors": [
            {"round": r.round, "user": r.user, "turn": r.turn, "error": r.error} for r in records if r.error is not None
        ],
        "wall_s": wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "ttft_p99_ms_by_round": [
            percentile([r.ttft for r in ok if r.round == k], 99) * 1e3 for k in sorted({r.round for r in records})
        ],
        "ttft_mean_ms": mean(ttft) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "e2e_p50_ms": percentile([r.e2e for r in ok], 50) * 1e3,
        "output_tokens": sum(r.completion_tokens for r in ok),
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / wall,
        "requests_per_s": len(ok) / wall,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cache_hit_rate": cached / prompt if prompt else math.nan,
        "turn1_cached_tokens": sum(r.cached_tokens for r in ok if r.turn == 1),
        "ttft_by_turn_ms": [x * 1e3 for x in per_turn],
        "ttft_last_over_first": per_turn[-1] / per_turn[0] if turns > 1 else math.nan,
        "prompt_tokens_by_turn": prompt_by_turn,
        "replies_not_max_new_tokens": sum(r.completion_tokens != max_new_tokens for r in ok),
        "finish_reasons": sorted({str(r.finish_reason) for r in ok}),
        "cache_check": {
            "turns_history_covered": history_covered,
            "turns_history_missed": history_missed,
            "turns_cached_beyond_history": beyond_history,
            "missed_examples": missed_examples,
            "turns_cached_without_reuse": nonzero_without_reuse,
        },
        "replies": {f"{r.round}/{r.user}/{r.turn}": r.reply for r in ok},
        "per_request": [request_row(r, round_start[r.round]) for r in sorted(records, key=lambda r: r.start)],
    }


# ---- replicas behind the gateway -------------------------------------------------------------------------------------
REPLICA_CONFIGS = {  # name -> (replicas, smg policy or None: straight to the replica)
    "1 replica": (1, None),
    "2, round robin": (2, "round_robin"),
    "2, affinity": (2, "consistent_hashing"),
}
ROUTING_KEY = "X-SMG-Routing-Key"  # consistent_hashing's key: the conversation's id, as README "Many replicas" says
HIT_RATE_GOAL_POINTS = 2.0  # affinity's hit rate over 2 replicas within this many points of one replica's
P99_AFFINITY_GOAL = 2.0  # p99 TTFT round robin / affinity at least this


class Gateway:
    """smg in front of the replicas with one routing policy, on loopback, started as launch/replicas.sh starts it
    (no overload veto, health checks every 2 s). With consistent_hashing each user sends its conversation's id as
    the routing key."""

    def __init__(self, replicas: list[Server], policy: str, log_dir: Path):
        smg = Path(sys.executable).with_name("smg")
        smg = str(smg) if smg.exists() else "smg"
        self.policy, self.port, self.model = policy, free_port(), replicas[0].model
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            smg, "launch", "--worker-urls", *(r.url for r in replicas), "--policy", policy,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
            "--disable-worker-overload-protection",
        ]  # fmt: skip
        self.command = cmd
        self.log_path = log_dir / f"gateway-{policy}-{self.port}.log"
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                workers = httpx.get(f"{self.url}/workers", timeout=2).json()["workers"]
                if len(workers) == len(replicas) and all(w["is_healthy"] for w in workers):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise click.ClickException(f"the gateway did not come up ({' '.join(cmd)}):\n{tail}")

    def client(self, user: int | None = None) -> openai.OpenAI:
        headers = {ROUTING_KEY: f"conversation-{user}"} if self.policy == "consistent_hashing" else None
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300, default_headers=headers
        )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def shared_system(scripts: dict, system_tokens: int, seed: int, encode: Callable[[str], list[int]]) -> str:
    """One system prompt of about `system_tokens` tokens, given to every user of `scripts` (in place)."""
    head = "You are the assistant of the Example company's help desk. What the users told you in earlier chats:"
    system = fill_to(head, demo_sentences(random.Random(f"{seed}-system")), system_tokens, lambda t: len(encode(t)))
    for k in scripts:
        scripts[k] = [dataclasses.replace(u, system=system) for u in scripts[k]]
    return system


def compare_replicas(
    ckpt: Path, scripts: dict, options: list[str], threads: int, work: Path, users: list[int], rounds: int,
    think: float, arrival: float, seed: int,
) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Two replicas (world size 1 each, reuse on) and a gateway per policy in front of them; for each round and
    users count, every configuration of REPLICA_CONFIGS in turn (the order rotating), each replica's cache flushed
    before each. Returns ([configuration, users, records, wall, counters]...) pooled per configuration, and what
    each process was started with and how it ended."""
    replicas: list[Server] = []
    gateways: dict[str, Gateway] = {}
    pool: dict[tuple[str, int], dict] = {}
    servers: list[dict] = []
    try:
        for i in range(2):
            log(f"starting replica {i}")
            replicas.append(Server(ckpt, True, options, threads, work))
            warm = TurnRecord(-1, -1, 0, time.perf_counter())
            with replicas[-1].client() as client:
                chat_turn(client, replicas[-1].model, [{"role": "user", "content": "Warm up, please."}], warm)
        for name, (_, policy) in REPLICA_CONFIGS.items():
            if policy is not None:
                log(f"starting the gateway, policy {policy}")
                gateways[name] = Gateway(replicas, policy, work)
        names = list(REPLICA_CONFIGS)
        for k in range(rounds):
            for index, n in enumerate(users):
                shift = (k * len(users) + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    count, _ = REPLICA_CONFIGS[name]
                    target = gateways.get(name) or replicas[0]
                    for replica in replicas:
                        replica.flush()
                    log(f"  round {k + 1}/{rounds}: {n} users x {len(scripts[k, n][0].messages)} turns, {name}")
                    before = [r.counters() for r in replicas[:count]]
                    records, wall = run_users(target, scripts[k, n], think, arrival, seed, k)
                    after = [r.counters() for r in replicas[:count]]
                    acc = pool.setdefault((name, n), {"records": [], "wall": 0.0, "counters": {}})
                    acc["records"] += records
                    acc["wall"] += wall
                    for a, b in zip(after, before, strict=True):
                        for c in COUNTERS:
                            acc["counters"][c] = acc["counters"].get(c, 0) + a[c] - b.get(c, 0)
                    acc["per_replica_generated"] = [a["tp_infer_generated_tokens"] for a in after]
                    errors = sum(r.error is not None for r in records)
                    ttft = percentile([r.ttft for r in records if r.error is None], 50) * 1e3
                    log(f"    {wall:.1f} s, TTFT p50 {fmt(ttft)} ms, errors {errors}, load {os.getloadavg()[0]:.2f}")
    finally:
        for gateway in gateways.values():
            gateway.stop()
        for i, replica in enumerate(replicas):
            info = {"replica": i, "command": replica.command, "startup_s": round(replica.startup_s, 1)}
            info.update(replica.stop())
            info["log_tail"] = replica.output()[-2000:]
            servers.append(info)
            log(f"replica {i} stopped: exit code {info['exit_code']}")
    return [{"name": name, "users": n, **acc} for (name, n), acc in pool.items()], servers


def replica_report(pooled: list[dict], turns: int, max_new_tokens: int) -> tuple[list[dict], dict]:
    """The figures of each configuration, a table of them side by side, and the ratios against the goals."""
    runs = []
    for p in pooled:
        summary = summarize(p["records"], p["wall"], turns, max_new_tokens, True)
        summary["config"] = p["name"]
        summary["server_counters"] = p["counters"]
        summary["server_agrees"] = p["counters"] == {
            "tp_infer_prompt_tokens": summary["prompt_tokens"],
            "tp_infer_cached_tokens": summary["cached_tokens"],
            "tp_infer_generated_tokens": summary["output_tokens"],
        }
        runs.append(summary)
    order = list(REPLICA_CONFIGS)
    runs.sort(key=lambda r: (r["users"], order.index(r["config"])))
    head = (
        f"{'config':<22}{'hit rate':>10}{'history':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
        f"{'out tok/s':>11}{'req/s':>8}{'reqs':>6}{'errs':>6}"
    )
    print("latencies in ms; history: later turns that found their whole history cached")
    print(head)
    print("-" * len(head))
    for r in runs:
        c = r["cache_check"]
        later = c["turns_history_covered"] + c["turns_history_missed"]
        print(
            f"{r['config'] + ' x' + str(r['users']):<22}{fmt(r['cache_hit_rate'] * 100):>9}%"
            f"{str(c['turns_history_covered']) + '/' + str(later):>11}{fmt(r['ttft_p50_ms']):>10}"
            f"{fmt(r['ttft_p99_ms']):>10}{fmt(r['tpot_p50_ms']):>10}{fmt(r['output_tokens_per_s']):>11}"
            f"{fmt(r['requests_per_s'], 2):>8}{r['requests']:>6}{len(r['errors']):>6}"
        )
    print()
    print("mean time to first token per turn (ms)")
    head = f"{'config':<22}" + "".join(f"{'t' + str(t):>8}" for t in range(1, turns + 1))
    print(head)
    print("-" * len(head))
    for r in runs:
        cells = "".join(f"{fmt(x):>8}" for x in r["ttft_by_turn_ms"])
        print(f"{r['config'] + ' x' + str(r['users']):<22}{cells}")
    print()
    print("ratios and goals")
    out: dict = {}
    for users in sorted({r["users"] for r in runs}):
        find = {r["config"]: r for r in runs if r["users"] == users}
        one, rr, aff = (find.get(name) for name in REPLICA_CONFIGS)
        if not (one and rr and aff):
            continue
        gap = (one["cache_hit_rate"] - aff["cache_hit_rate"]) * 100
        rr_gap = (one["cache_hit_rate"] - rr["cache_hit_rate"]) * 100
        p99 = rr["ttft_p99_ms"] / aff["ttft_p99_ms"]
        p50 = rr["ttft_p50_ms"] / aff["ttft_p50_ms"]
        throughput = aff["output_tokens_per_s"] / one["output_tokens_per_s"]
        entry = {
            "hit_rate_points_below_one_replica": {"affinity": gap, "round_robin": rr_gap},
            "hit_rate_met": gap <= HIT_RATE_GOAL_POINTS,
            "p99_ttft_round_robin_over_affinity": p99,
            "p99_met": p99 >= P99_AFFINITY_GOAL,
            "p50_ttft_round_robin_over_affinity": p50,
            "p99_ttft_one_replica_over_affinity": one["ttft_p99_ms"] / aff["ttft_p99_ms"],
            "throughput_affinity_over_one_replica": throughput,
            "throughput_affinity_over_round_robin": aff["output_tokens_per_s"] / rr["output_tokens_per_s"],
        }
        out[str(users)] = entry
        print(
            f"  x{users}: hit rate 1 replica {fmt(one['cache_hit_rate'] * 100)}%, 2 with affinity "
            f"{fmt(aff['cache_hit_rate'] * 100)}% ({fmt(gap)} points below; goal <= {HIT_RATE_GOAL_POINTS:g}): "
            f"{'met' if entry['hit_rate_met'] else 'MISSED'}; round robin {fmt(rr['cache_hit_rate'] * 100)}% "
            f"({fmt(rr_gap)} points below)"
        )
        print(
            f"  x{users}: p99 TTFT round robin / affinity = {fmt(rr['ttft_p99_ms'])} / {fmt(aff['ttft_p99_ms'])} = "
            f"{fmt(p99, 2)} (goal >= {P99_AFFINITY_GOAL:g}): {'met' if entry['p99_met'] else 'MISSED'}; p50 "
            f"{fmt(p50, 2)}; 1 replica / affinity p99 {fmt(entry['p99_ttft_one_replica_over_affinity'], 2)}"
        )
        print(
            f"  x{users}: output tokens/s affinity / 1 replica = {fmt(throughput, 2)}, affinity / round robin = "
            f"{fmt(entry['throughput_affinity_over_round_robin'], 2)}"
        )
    return runs, out


# ---- report ----------------------------------------------------------------------------------------------------------
def no_nan(value):
    """NaN (a figure without samples) as null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_tables(runs: list[dict], turns: int) -> None:
    head = (
        f"{'config':<18}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'TPOT p50':>10}"
        f"{'out tok/s':>11}{'req/s':>8}{'hit rate':>10}{'reqs':>6}{'errs':>6}"
    )
    print("latencies in ms")
    print(head)
    print("-" * len(head))
    for r in runs:
        name = f"{'reuse' if r['reuse'] else 'no-reuse'} x{r['users']}"
        print(
            f"{name:<18}{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p99_ms']):>10}{fmt(r['itl_p50_ms']):>9}"
            f"{fmt(r['itl_p99_ms']):>9}{fmt(r['tpot_p50_ms']):>10}{fmt(r['output_tokens_per_s']):>11}"
            f"{fmt(r['requests_per_s'], 2):>8}{fmt(r['cache_hit_rate'] * 100):>9}%{r['requests']:>6}"
            f"{len(r['errors']):>6}"
        )
    print()
    print("mean time to first token per turn (ms)")
    head = f"{'config':<18}" + "".join(f"{'t' + str(t):>8}" for t in range(1, turns + 1)) + f"{'last/1st':>10}"
    print(head)
    print("-" * len(head))
    for r in runs:
        name = f"{'reuse' if r['reuse'] else 'no-reuse'} x{r['users']}"
        cells = "".join(f"{fmt(x):>8}" for x in r["ttft_by_turn_ms"])
        print(f"{name:<18}{cells}{fmt(r['ttft_last_over_first'], 2):>10}")
    for r in runs:  # the same prompts with reuse on and off (greedy replies)
        if r["reuse"]:
            cells = "".join(f"{fmt(x, 0):>8}" for x in r["prompt_tokens_by_turn"])
            print(f"{'prompt tokens x' + str(r['users']):<18}{cells}   (mean per turn)")
    print()


def goals(runs: list[dict], turns: int) -> dict:
    find = {(r["reuse"], r["users"]): r for r in runs}
    out: dict = {"ttft_last_over_first_reuse": {}, "ttft_turn_goal": TTFT_TURN_GOAL}
    print("goals")
    for r in runs:
        if r["reuse"]:
            ratio = r["ttft_last_over_first"]
            met = ratio <= TTFT_TURN_GOAL
            out["ttft_last_over_first_reuse"][str(r["users"])] = {"ratio": ratio, "met": met}
            print(
                f"  reuse x{r['users']}: TTFT turn {turns} / turn 1 = {fmt(ratio, 2)} "
                f"(goal <= {TTFT_TURN_GOAL}): {'met' if met else 'MISSED'}"
            )
    on, off = find.get((True, P99_RATIO_USERS)), find.get((False, P99_RATIO_USERS))
    if on and off:
        ratio = off["ttft_p99_ms"] / on["ttft_p99_ms"]
        met = ratio >= P99_RATIO_GOAL
        out["p99_ttft_no_reuse_over_reuse"] = {"users": P99_RATIO_USERS, "ratio": ratio, "met": met}
        print(
            f"  x{P99_RATIO_USERS}: p99 TTFT no-reuse / reuse = {fmt(off['ttft_p99_ms'])} / {fmt(on['ttft_p99_ms'])}"
            f" = {fmt(ratio, 2)} (goal >= {P99_RATIO_GOAL}): {'met' if met else 'MISSED'}"
        )
        by_round = [b / a for a, b in zip(on["ttft_p99_ms_by_round"], off["ttft_p99_ms_by_round"], strict=True)]
        out["p99_ttft_no_reuse_over_reuse"]["by_round"] = by_round
        print(f"    by round: {', '.join(fmt(x, 2) for x in by_round)}")
    else:
        out["p99_ttft_no_reuse_over_reuse"] = None
        print(f"  p99 TTFT no-reuse / reuse: n/a ({P99_RATIO_USERS} not among --users)")
    for users in sorted({r["users"] for r in runs}):
        a, b = find.get((True, users)), find.get((False, users))
        if a and b:
            ratio = b["ttft_p99_ms"] / a["ttft_p99_ms"]
            out.setdefault("p99_ttft_ratio_by_users", {})[str(users)] = ratio
            if users != P99_RATIO_USERS:
                print(f"  (x{users}: p99 TTFT no-reuse / reuse = {fmt(ratio, 2)})")
    return out


def plot(runs: list[dict], turns: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = plt.get_cmap("tab10")
    counts = sorted({r["users"] for r in runs})
    x = list(range(1, turns + 1))
    for r in runs:
        colour = colours(counts.index(r["users"]) % 10)
        style = "-" if r["reuse"] else "--"
        label = f"{r['users']} users, reuse {'on' if r['reuse'] else 'off'}"
        ax.plot(x, r["ttft_by_turn_ms"], style, marker="o" if r["reuse"] else "s", color=colour, label=label)
    ax.set_xlabel("turn")
    ax.set_ylabel("mean time to first token (ms)")
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------------------------------------
def users_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        counts = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 8,16") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 8,16")
    return counts


def user_tokens_range(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        lo, _, hi = value.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise click.BadParameter("LO-HI tokens, e.g. 60-100, or 0 for single demo messages") from None
    if min(bounds) < 0 or bounds[0] > bounds[1] or bounds[0] == 0 < bounds[1]:
        raise click.BadParameter("LO-HI tokens with 1 <= LO <= HI, e.g. 60-100, or 0 for single demo messages")
    return bounds


def run_child(code: str, *argv: str, what: str) -> None:
    """Python code in a child process (the model's work stays out of the process that times the users)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, env=child_env()
    )
    if done.returncode != 0:
        raise click.ClickException(f"{what} failed:\n{done.stderr[-3000:]}")


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": python_path(REPO, REPO / "scripts")}


def convert_demo(out: Path) -> None:
    code = "import sys; from tp_infer.convert import convert; convert(sys.argv[1], sys.argv[2], 1)"
    run_child(code, str(DEMO_MODEL), str(out), what=f"converting {DEMO_MODEL}")


def build_bench_model(out: str | Path, seed: int) -> None:
    """Random weights in the shape of configs/config_bench.json (bench_multiturn.py's, so that activations stay O(1)
    and routing matters) with the demo model's tokenizer and chat template, its vocabulary rounded up to a multiple
    of VOCAB_MULTIPLE: a Hugging Face folder, converted for one rank into `out` (the folder is removed)."""
    import shutil

    import torch
    from bench_multiturn import check_same_architecture, random_hf_model

    from tp_infer.config import load_config
    from tp_infer.convert import convert

    out = Path(out)
    args = load_config(BENCH_CONFIG, dtype="fp32")
    vocab = -(-tokenizer_size(DEMO_MODEL) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    args = dataclasses.replace(args, vocab_size=vocab)
    hf_dir = out.with_name(out.name + "-hf")
    random_hf_model(args, torch.float32, seed).save_pretrained(hf_dir)
    for file in DEMO_MODEL.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens_map")) or "chat_template" in file.name:
            shutil.copy2(file, hf_dir / file.name)
    convert(hf_dir, out, 1)
    runtime = {"dtype": args.dtype, "attn_impl": args.attn_impl, "max_seq_len": args.max_seq_len}
    check_same_architecture(args, load_config(out / "config.json", max_batch_size=args.max_batch_size, **runtime))
    shutil.rmtree(hf_dir)


def tokenizer_size(folder: Path) -> int:
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def encoder(folder: Path) -> Callable[[str], list[int]]:
    """Token ids of a text, no special tokens: the sizes of system prompts and messages."""
    import tokenizers

    path = folder / "tokenizer.json" if (folder / "tokenizer.json").exists() else DEMO_MODEL / "tokenizer.json"
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


class LoadSampler:
    """The 1-minute load average every `every` seconds, in a thread, while the runs go on."""

    def __init__(self, every: float = 10.0):
        self.samples: list[float] = [os.getloadavg()[0]]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, args=(every,), daemon=True)
        self.thread.start()

    def sample(self, every: float) -> None:
        while not self.stopped.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self.stopped.set()
        self.thread.join()
        self.samples.append(os.getloadavg()[0])
        return self.samples


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--model",
    default="bench",
    show_default=True,
    type=click.Choice(list(MODEL_DEFAULTS)),
    help="bench: random weights shaped as configs/config_bench.json (hidden 1024, 8 layers, MoE) with the demo "
    "tokenizer, long shared-nothing conversations; demo: the shipped demo model (hidden 192, 4 layers) and short "
    "demo chats. Sets the defaults marked [model].",
)
@click.option(
    "--replicas",
    is_flag=True,
    help="Compare one replica with two behind the gateway (smg), round robin and affinity by routing key, every "
    "user opening with one shared system prompt, instead of reuse on and off. Sets the defaults marked [replicas].",
)
@click.option("--users", callback=users_list, help="Users counts, e.g. 8,16,32. [default 8,16; replicas: 32]")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    help="Runs per users count and configuration, each with fresh conversations; their figures are pooled. "
    "[model: bench 1, demo 3; replicas: 3]",
)
@click.option("--turns", default=8, show_default=True, type=click.IntRange(min=1), help="Turns per conversation.")
@click.option(
    "--max-new-tokens", type=click.IntRange(min=2), help="Tokens per reply (eos ignored). [model: bench 32, demo 16]"
)
@click.option(
    "--system-tokens",
    type=click.IntRange(min=0),
    help="Each user's own system prompt, about this many tokens of demo-chat text beginning with a word no other "
    "user's begins with; 0: none. With --replicas one system prompt of this many tokens that every user shares. "
    "[model: bench 150, demo 0; replicas: 400]",
)
@click.option(
    "--user-tokens",
    callback=user_tokens_range,
    help="LO-HI: each user message chains demo-chat messages to a seeded LO..HI tokens; 0: one demo message per "
    "turn. [model: bench 60-100, demo 0; replicas: 30-50]",
)
@click.option(
    "--think", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Scale of the 0.2-1.0 s think time."
)
@click.option(
    "--arrival",
    type=click.FloatRange(min=0),
    help="Users arrive at seeded uniform times within this many seconds (then think before turn 1 too). "
    "[model: bench 10, demo 0; replicas: 5]",
)
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Server's.")
@click.option(
    "--max-num-batched-tokens", default=512, show_default=True, type=click.IntRange(min=1), help="Server's step budget."
)
@click.option("--max-seq-len", type=click.IntRange(min=1), help="Server's. [model: bench 2048, demo 1024]")
@click.option(
    "--server-threads", type=click.IntRange(min=1), help="OMP_NUM_THREADS of the server. [model: bench 2, demo 1]"
)
@device_option("Where the servers run: the CPU or one GPU, both servers on it (world size 1).")
@attn_impl_option(
    "The servers' MLA form: the latent cache, or per-head keys and values (an extend over a long history costs fewer "
    "FLOPs)."
)
@click.option(
    "--ckpt-path",
    type=click.Path(file_okay=False),
    help="Serve this converted checkpoint instead of building --model's (whose defaults still apply).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of weights, conversations, think times.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write every figure here as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the per-turn TTFT plot here (PNG).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Keep the converted model and server logs here.")
def main(
    model, replicas, users, rounds, turns, max_new_tokens, system_tokens, user_tokens, think, arrival, max_batch_size,
    max_num_batched_tokens, max_seq_len, server_threads, device, attn_impl, ckpt_path, seed, out, plot_path, work_dir,
):  # fmt: skip
    """Simulated chat users against tp_infer's server, history reuse on and off: TTFT, ITL, throughput, cache hits."""
    began = time.monotonic()
    # a SIGTERM (timeout, a job's end) unwinds as an exception would, so that the servers are stopped too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load_before = os.getloadavg()
    given = {
        "rounds": rounds, "max_new_tokens": max_new_tokens, "system_tokens": system_tokens, "user_tokens": user_tokens,
        "arrival": arrival, "max_seq_len": max_seq_len, "server_threads": server_threads,
    }  # fmt: skip
    defaults = {**MODEL_DEFAULTS[model], **(REPLICAS_DEFAULTS if replicas else {})}
    s = {k: defaults[k] if v is None else v for k, v in given.items()}
    users = users or ([32] if replicas else [8, 16])
    rounds, max_new_tokens, max_seq_len, server_threads = (
        s["rounds"], s["max_new_tokens"], s["max_seq_len"], s["server_threads"]
    )  # fmt: skip
    if max(users) > max_batch_size:
        log(f"note: {max(users)} users > --max-batch-size {max_batch_size}: some turns will wait for a slot")
    phases: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        if ckpt_path:
            ckpt = Path(ckpt_path)
        elif model == "demo":
            ckpt = work / "demo"
            if not (ckpt / "model0-mp1.safetensors").exists():
                log(f"converting {DEMO_MODEL} for one rank into {ckpt}")
                convert_demo(ckpt)
        else:
            ckpt = work / f"bench-seed{seed}"
            if not (ckpt / "model0-mp1.safetensors").exists():
                log(f"building random weights shaped as {BENCH_CONFIG.name} and converting them into {ckpt}")
                code = "import sys; from bench_serving import build_bench_model as b; b(sys.argv[1], int(sys.argv[2]))"
                run_child(code, str(ckpt), str(seed), what="building the bench model")
        phases["model"] = time.monotonic() - began
        encode = encoder(ckpt)
        own_system = 0 if replicas else s["system_tokens"]  # with --replicas, one shared below
        scripts = user_scripts(users, rounds, turns, seed, own_system, s["user_tokens"], encode)
        shared = shared_prefix(scripts, encode)
        options = [
            "--device", device.type, "--dtype", "fp32", "--attn-impl", attn_impl, "--ignore-eos",
            "--max-new-tokens", str(max_new_tokens),
            "--max-batch-size", str(max_batch_size), "--max-num-batched-tokens", str(max_num_batched_tokens),
            "--max-seq-len", str(max_seq_len),
        ]  # fmt: skip
        if replicas:
            system = shared_system(scripts, s["system_tokens"], seed, encode)
            sampler = LoadSampler()
            try:
                pooled, servers = compare_replicas(
                    ckpt, scripts, options, server_threads, work, users, rounds, think, s["arrival"], seed
                )
            finally:
                loads = sampler.stop()
            settings = {
                "model": model, "checkpoint": str(ckpt_path or ckpt), "users": users, "rounds": rounds, "turns": turns,
                "max_new_tokens": max_new_tokens, "system_tokens": len(encode(system)),
                "user_tokens": list(s["user_tokens"]), "arrival_s": s["arrival"],
                "think_s": [THINK_RANGE[0] * think, THINK_RANGE[1] * think], "max_batch_size": max_batch_size,
                "max_seq_len": max_seq_len, "server_threads": server_threads, "device": device.type, "seed": seed,
            }  # fmt: skip
            replicas_output(pooled, servers, settings, loads, load_before, began, out)
            return
        pool: dict[tuple[bool, int], dict] = {}
        live: dict[bool, Server] = {}
        servers = []
        sampler = LoadSampler()
        try:
            started = time.monotonic()
            for reuse in (True, False):  # both at once (an idle one waits on a queue): their runs interleave
                log(f"starting the server, reuse {'on' if reuse else 'off'}")
                live[reuse] = server = Server(ckpt, reuse, options, server_threads, work)
                # one request outside the figures: the first call pays for lazy initialisation
                warm = TurnRecord(-1, -1, 0, time.perf_counter())
                with server.client() as client:
                    chat_turn(client, server.model, [{"role": "user", "content": "Warm up, please."}], warm)
            phases["servers up"] = time.monotonic() - started
            for k in range(rounds):
                for index, n in enumerate(users):
                    # alternate which configuration goes first, so a drift in the machine's load hits both alike
                    for reuse in (True, False) if (k + index) % 2 == 0 else (False, True):
                        server = live[reuse]
                        log(f"  round {k + 1}/{rounds}: {n} users x {turns} turns, reuse {'on' if reuse else 'off'}")
                        before = server.counters()
                        records, wall = run_users(server, scripts[k, n], think, s["arrival"], seed, k)
                        after = server.counters()
                        acc = pool.setdefault((reuse, n), {"records": [], "wall": 0.0, "counters": {}})
                        acc["records"] += records
                        acc["wall"] += wall
                        for name in COUNTERS:
                            acc["counters"][name] = acc["counters"].get(name, 0) + after[name] - before.get(name, 0)
                        errors = sum(r.error is not None for r in records)
                        ttft = percentile([r.ttft for r in records if r.error is None], 50) * 1e3
                        log(
                            f"    {wall:.1f} s, TTFT p50 {fmt(ttft)} ms, errors {errors}, load {os.getloadavg()[0]:.2f}"
                        )
        finally:
            for reuse, server in live.items():
                info = {"reuse": reuse, "command": server.command, "startup_s": round(server.startup_s, 1)}
                info.update(server.stop())
                info["log_tail"] = server.output()[-2000:]
                servers.append(info)
                log(f"server reuse {'on' if reuse else 'off'} stopped: exit code {info['exit_code']}")
            loads = sampler.stop()
    runs = []
    for (reuse, _), acc in pool.items():
        summary = summarize(acc["records"], acc["wall"], turns, max_new_tokens, reuse)
        summary["server_counters"] = acc["counters"]
        summary["server_agrees"] = acc["counters"] == {
            "tp_infer_prompt_tokens": summary["prompt_tokens"],
            "tp_infer_cached_tokens": summary["cached_tokens"],
            "tp_infer_generated_tokens": summary["output_tokens"],
        }
        runs.append(summary)
    runs.sort(key=lambda r: (r["users"], not r["reuse"]))
    source = ckpt_path or ("demo/model" if model == "demo" else f"random weights, {BENCH_CONFIG.relative_to(REPO)}")
    lo, hi = s["user_tokens"]
    print()
    print(
        f"model {ckpt.resolve().name} ({source}), world size 1, {device.type} fp32, {attn_impl} MLA, max batch "
        f"{max_batch_size}, step budget {max_num_batched_tokens} tokens, max seq len {max_seq_len}, server OMP "
        f"threads {server_threads}"
    )
    print(
        f"{rounds} round{'s' if rounds > 1 else ''} of {turns}-turn conversations: "
        + (f"own system prompt of ~{s['system_tokens']} tokens, " if s["system_tokens"] else "no system prompt, ")
        + (f"user messages of {lo}-{hi} tokens, " if hi else "one demo message per turn, ")
        + f"{max_new_tokens}-token replies (eos ignored); "
        + (f"users arrive within {s['arrival']:g} s, " if s["arrival"] else "")
        + f"think {THINK_RANGE[0] * think:.2f}-{THINK_RANGE[1] * think:.2f} s before each turn; any two users' first "
        f"turns share at most {shared} leading token{'' if shared == 1 else 's'} after the template's"
    )
    print_tables(runs, turns)
    checks = check_lines(runs, servers, max_new_tokens)
    print("checks")
    for line in checks:
        print(f"  {line}")
    print()
    goal = goals(runs, turns)
    elapsed = time.monotonic() - began
    load_after = os.getloadavg()
    walls = ", ".join(f"{'reuse' if r['reuse'] else 'no-reuse'} x{r['users']} {r['wall_s']:.0f} s" for r in runs)
    print()
    print(
        f"elapsed {elapsed:.0f} s: model {phases['model']:.0f} s, servers up {phases.get('servers up', math.nan):.0f}"
        f" s, runs {walls}"
    )
    print(
        f"load average (1 min) before {load_before[0]:.2f}, during the run min {min(loads):.2f} mean "
        f"{mean(loads):.2f} max {max(loads):.2f} ({len(loads)} samples), after {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )
    if out:
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": {
                "model": model,
                "checkpoint": str(ckpt_path or source),
                "users": users,
                "rounds": rounds,
                "turns": turns,
                "max_new_tokens": max_new_tokens,
                "system_tokens": s["system_tokens"],
                "user_tokens": list(s["user_tokens"]),
                "arrival_s": s["arrival"],
                "think_s": [THINK_RANGE[0] * think, THINK_RANGE[1] * think],
                "max_batch_size": max_batch_size,
                "max_num_batched_tokens": max_num_batched_tokens,
                "max_seq_len": max_seq_len,
                "server_threads": server_threads,
                "device": device.type,
                "attn_impl": attn_impl,
                "seed": seed,
                "first_turns_shared_tokens": shared,
            },
            "runs": runs,
            "servers": servers,
            "checks": checks,
            "goals": goal,
            "elapsed_s": elapsed,
            "phases_s": phases,
            "load_average": {
                "before": load_before,
                "during_1min": loads,
                "after": load_after,
                "cpus": os.cpu_count(),
            },
            "user_scripts": {f"{k}/{n}": [dataclasses.asdict(u) for u in v] for (k, n), v in scripts.items()},
        }
        Path(out).write_text(json.dumps(no_nan(result), indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}")
    if plot_path:
        name = ckpt.resolve().name if ckpt_path else "demo model" if model == "demo" else "random bench model"
        first, last = (mean([r["prompt_tokens_by_turn"][t] for r in runs]) for t in (0, -1))
        title = (
            f"tp_infer serving, {name}, {device.type} fp32: mean TTFT per turn\n"
            f"(prompts ~{first:.0f} tokens at turn 1, ~{last:.0f} at turn {turns}; {max_new_tokens}-token replies)"
        )
        plot(runs, turns, Path(plot_path), title)
        print(f"wrote {plot_path}")


def replicas_output(
    pooled: list[dict], servers: list[dict], settings: dict, loads: list[float], load_before, began: float, out
) -> None:
    """--replicas: the settings, the table side by side, ratios and goals, checks, time and load; --out as JSON."""
    turns, max_new_tokens = settings["turns"], settings["max_new_tokens"]
    lo, hi = settings["user_tokens"]
    messages = f"{lo}-{hi} tokens" if hi else "one demo message"
    print()
    print(
        f"model {Path(settings['checkpoint']).name}, replicas of world size 1 ({settings['device']} fp32, "
        f"{settings['server_threads']} OMP thread{'s' if settings['server_threads'] > 1 else ''} each, max batch "
        f"{settings['max_batch_size']}, max seq len {settings['max_seq_len']}); 1 replica: straight to it; 2: "
        f"behind smg (round_robin, or consistent_hashing with {ROUTING_KEY} = the conversation's id); every "
        f"replica's cache flushed before each run"
    )
    print(
        f"{settings['rounds']} round{'s' if settings['rounds'] > 1 else ''} of {turns}-turn conversations opening with "
        f"one shared system prompt of {settings['system_tokens']} tokens, user messages of {messages}, "
        f"{max_new_tokens}-token replies (eos ignored); users arrive within {settings['arrival_s']:g} s, think "
        f"{settings['think_s'][0]:.2f}-{settings['think_s'][1]:.2f} s before each turn"
    )
    runs, ratios = replica_report(pooled, turns, max_new_tokens)
    print()
    print("checks")
    checks = []
    for r in runs:
        name = f"{r['config']} x{r['users']}"
        problems = []
        if r["errors"]:
            problems.append(f"{len(r['errors'])} failed requests, first: {r['errors'][0]}")
        if r["replies_not_max_new_tokens"]:
            problems.append(f"{r['replies_not_max_new_tokens']} replies without {max_new_tokens} completion tokens")
        if r["cache_check"]["turns_cached_beyond_history"]:
            problems.append(f"{r['cache_check']['turns_cached_beyond_history']} turns cached beyond their history")
        if not r["server_agrees"]:
            problems.append(f"/metrics counters {r['server_counters']} differ from the usage seen")
        checks.append(f"{name}: " + ("; ".join(problems) if problems else "ok (/metrics agree with usage)"))
    by_users: dict[int, list[dict]] = {}
    for r in runs:
        by_users.setdefault(r["users"], []).append(r)
    for users, group in by_users.items():  # greedy: the same replies, but for histories re-encoded from text
        one = next(r for r in group if r["config"] == "1 replica")
        for r in group:
            if r is not one:
                keys = set(one["replies"]) & set(r["replies"])
                same = sum(one["replies"][k] == r["replies"][k] for k in keys)
                checks.append(f"{r['config']} x{users}: replies identical to 1 replica's: {same} of {len(keys)}")
    for info in servers:
        status = "ok" if info["exit_code"] == 0 and not info["killed"] else f"exit code {info['exit_code']}"
        checks.append(f"replica {info['replica']}: {status}, exited {info['exit_s']} s after SIGTERM")
    for line in checks:
        print(f"  {line}")
    elapsed = time.monotonic() - began
    load_after = os.getloadavg()
    print()
    walls = ", ".join(f"{r['config']} x{r['users']} {r['wall_s']:.0f} s" for r in runs)
    print(f"elapsed {elapsed:.0f} s; runs {walls}")
    print(
        f"load average (1 min) before {load_before[0]:.2f}, during the run min {min(loads):.2f} mean "
        f"{mean(loads):.2f} max {max(loads):.2f} ({len(loads)} samples), after {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )
    if out:
        for r in runs:
            r.pop("replies")
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": settings,
            "runs": runs,
            "ratios": ratios,
            "servers": servers,
            "checks": checks,
            "elapsed_s": elapsed,
            "load_average": {"before": load_before, "during_1min": loads, "after": load_after, "cpus": os.cpu_count()},
        }
        Path(out).write_text(json.dumps(no_nan(result), indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}")


def check_lines(runs: list[dict], servers: list[dict], max_new_tokens: int) -> list[str]:
    """One line per check, 'ok' or what went wrong."""
    lines = []
    for r in runs:
        name = f"{'reuse' if r['reuse'] else 'no-reuse'} x{r['users']}"
        problems = []
        if r["errors"]:
            problems.append(f"{len(r['errors'])} failed requests, first: {r['errors'][0]}")
        if r["replies_not_max_new_tokens"]:
            problems.append(f"{r['replies_not_max_new_tokens']} replies without {max_new_tokens} completion tokens")
        c = r["cache_check"]
        if r["reuse"] and c["turns_history_missed"]:
            problems.append(
                f"{c['turns_history_missed']} turns whose cached_tokens miss history: {c['missed_examples']}"
            )
        if r["reuse"] and c["turns_cached_beyond_history"]:
            problems.append(f"{c['turns_cached_beyond_history']} turns cached beyond their own history")
        if not r["reuse"] and c["turns_cached_without_reuse"]:
            problems.append(f"{c['turns_cached_without_reuse']} turns report cached tokens without reuse")
        if not r["server_agrees"]:
            problems.append(f"/metrics counters {r['server_counters']} differ from the usage seen")
        later = c["turns_history_covered"] + c["turns_history_missed"]
        detail = (
            f"history from the cache on {c['turns_history_covered']} of {later} later turns, "
            f"turn-1 cached tokens {r['turn1_cached_tokens']}"
            if r["reuse"]
            else "no cached tokens"
        )
        lines.append(f"{name}: " + ("; ".join(problems) if problems else f"ok ({detail}; /metrics agree)"))
    same = total = 0
    for users in sorted({r["users"] for r in runs}):
        pair = [r for r in runs if r["users"] == users]
        if len(pair) == 2:
            a, b = pair[0]["replies"], pair[1]["replies"]
            total += len(set(a) & set(b))
            same += sum(a[k] == b[k] for k in set(a) & set(b))
    lines.append(f"replies identical with reuse on and off: {same} of {total} (greedy)")
    for s in servers:
        name = f"server reuse {'on' if s['reuse'] else 'off'}"
        if s["exited_before_stop"]:
            lines.append(f"{name}: exited before SIGTERM with code {s['exit_code']}")
        elif s["killed"]:
            lines.append(f"{name}: did not exit within 60 s of SIGTERM, killed")
        else:
            status = "ok" if s["exit_code"] == 0 else f"exit code {s['exit_code']}"
            lines.append(f"{name}: {status}, exited {s['exit_s']} s after SIGTERM (started in {s['startup_s']} s)")
    return lines


if __name__ == "__main__":
    main()
