"""The server under conversations of many messages (issue 28): how long one request of --messages messages takes to
be rendered and answered, and how long /health takes to answer while a stream of such requests comes in.

python scripts/bench_server_limits.py [--ckpt-path demo/model] [--messages 10000] [--requests 100]
    [--concurrency 4] [--health-every 0.05] [--out limits.json]

One server (`python -m tp_infer.serve` on the demo model by default, world size 1, --device cpu, --dtype fp32, greedy,
4-token replies) with --max-messages and --max-body-bytes raised to take the requests. Each request is one conversation
of --messages messages (a system prompt, then user and assistant messages in turn, short seeded sentences, different in
every request, ending with a user message); the overflow policy keeps the turns that fit max_seq_len, so every request
is answered 200 after the whole conversation has been rendered and encoded. First one request alone (its time is the
render's, all but the 4 tokens), then --requests of them, --concurrency at a time, while a thread asks /health every
--health-every seconds and times each answer. The rendering runs off the server's event loop: /health should answer
within a fraction of a second throughout, however long the renders take (they share only the GIL with it). Printed: the
lone request's time, the stream's request times (median, max) and wall time, /health's latencies (median, p99, max, and
how many took over 1 s), and the server's peak RSS; --out gets them as JSON. Everything runs on this machine: compare
figures from one run."""

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import out_option, runtime_line

from tp_infer.convert import convert

REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "a", "cat", "sat", "on", "my", "name", "is", "Ada", "and", "I", "live", "in", "Paris", "how", "are"]


def conversation(n: int, rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n - 1):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))})
    if messages[-1]["role"] != "user":
        messages[-1]["role"] = "user"
    return messages


def rss_mb(pid: int) -> float:
    """The peak resident set of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, ckpt: str, messages: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.gettempdir()) / f"bench-server-limits-{self.port}.log"
        cmd = [sys.executable, "-m", "tp_infer.serve", "--ckpt-path", ckpt, "--device", "cpu", "--dtype", "fp32"]
        cmd += ["--port", str(self.port), "--max-new-tokens", "4", "--max-messages", str(messages)]
        cmd += ["--max-body-bytes", str(256 * 2**20)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise click.ClickException(f"the server did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@click.command()
@click.option(
    "--ckpt-path",
    default=str(REPO / "demo" / "model"),
    show_default=True,
    help="A checkpoint converted for one rank, or a Hugging Face folder (converted into a temporary one).",
)
@click.option("--messages", default=10_000, show_default=True, type=click.IntRange(min=2), help="Per request.")
@click.option("--requests", default=100, show_default=True, type=click.IntRange(min=0), help="In the stream.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1), help="Requests at once.")
@click.option("--health-every", default=0.05, show_default=True, type=float, help="Seconds between /health asks.")
@click.option("--seed", default=0, show_default=True, type=int, help="Of the conversations.")
@out_option()
def main(ckpt_path, messages, requests, concurrency, health_every, seed, out):
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rng = random.Random(seed)
    work = tempfile.TemporaryDirectory()
    if not (Path(ckpt_path) / "model0-mp1.safetensors").exists():
        convert(ckpt_path, Path(work.name) / "ckpt", 1)
        ckpt_path = str(Path(work.name) / "ckpt")
    server = Server(ckpt_path, messages)
    name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    results: dict = {"messages": messages, "requests": requests, "concurrency": concurrency, "model": name}
    try:
        lone = conversation(messages, rng)
        results["body_bytes"] = len(json.dumps({"model": name, "messages": lone}))

        def send(conv: list[dict]) -> float:
            body = {"model": name, "messages": conv, "temperature": 0}
            start = time.perf_counter()
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=3600)
            if response.status_code != 200:
                raise click.ClickException(f"a request was answered {response.status_code}: {response.text[:500]}")
            return time.perf_counter() - start

        results["lone_request_s"] = send(lone)
        print(f"one request of {messages} messages ({results['body_bytes'] / 1e6:.2f} MB): "
              f"{results['lone_request_s']:.2f} s", flush=True)  # fmt: skip

        latencies, done = [], threading.Event()

        def watch() -> None:
            while not done.is_set():
                start = time.perf_counter()
                try:
                    httpx.get(f"{server.url}/health", timeout=30)
                    latencies.append(time.perf_counter() - start)
                except httpx.HTTPError:
                    latencies.append(float("inf"))
                time.sleep(health_every)

        conversations = [conversation(messages, rng) for _ in range(requests)]
        watcher = threading.Thread(target=watch)
        watcher.start()
        stream_start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            times = list(pool.map(send, conversations))
        results["stream_wall_s"] = time.perf_counter() - stream_start
        done.set()
        watcher.join()
        ordered = sorted(latencies)
        results["request_s"] = {"median": statistics.median(times), "max": max(times)} if times else {}
        results["health_s"] = {
            "asked": len(ordered),
            "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": ordered[-1],
            "over_1s": sum(x > 1 for x in ordered),
        }
        results["server_peak_rss_mb"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
        work.cleanup()
    if requests:
        r, h = results["request_s"], results["health_s"]
        print(f"{requests} requests, {concurrency} at a time: {results['stream_wall_s']:.1f} s, "
              f"median {r['median']:.2f} s, max {r['max']:.2f} s")  # fmt: skip
        print(f"/health during the stream ({h['asked']} asks): median {h['median'] * 1e3:.1f} ms, "
              f"p99 {h['p99'] * 1e3:.1f} ms, max {h['max'] * 1e3:.1f} ms, {h['over_1s']} over 1 s")  # fmt: skip
    print(f"server peak RSS {results.get('server_peak_rss_mb', 0):.0f} MB")
    line, results["load_average_1min"] = runtime_line(time.perf_counter() - started, load_at_start)
    print(line)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
