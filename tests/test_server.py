"""The OpenAI-compatible server under torchrun, through the real `openai` client: chat and completions, streaming,
16 concurrent multi-turn clients whose histories come from the cache, a client that disconnects, a table of bad
requests, the API key, and a follower that dies."""

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from harness import free_port
from processes import ENV, REPO, assert_gone, descendants, kill_all, rank_pids, torchrun

OPTIONS = ["--device", "cpu", "--dtype", "fp32", "--max-seq-len", "256", "--max-new-tokens", "8"]
MODEL = "ckpt"  # the checkpoint folder's name
USERS = ["Hello there,", "My name is Ada", "how are you today?", "The code is 4821.", "and I live in Paris.", "Bye"]


def conversation(i: int) -> list[str]:
    """Client i's user messages: clients 0..3 each hold a conversation of their own (a first message nobody else
    sends, then USERS backwards, rotated), so no other prompt goes on from any of their histories; the others USERS
    rotated, so clients i and i + 6 (4 <= i < 10) hold the same one."""
    if i < 4:
        return [f"I am client {i}.", *(USERS[::-1][i:] + USERS[::-1][:i])[:5]]
    return USERS[i % 6 :] + USERS[: i % 6]


class Server:
    def __init__(self, world_size: int, ckpt: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = torchrun(world_size, "--ckpt-path", str(ckpt), *OPTIONS, "--port", str(self.port), *options)
        cmd[cmd.index("tp_infer.generate")] = "tp_infer.serve"
        self.headers: dict = {}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    def stop(self) -> None:
        pids = {self.proc.pid, *descendants(self.proc.pid)}
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kill_all(pids)
        assert_gone(pids)
        self.log.close()


@pytest.fixture(scope="module")
def server(chat_ckpt):
    s = Server(2, chat_ckpt, "--ignore-eos")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def batch_replies(chat_ckpt, tmp_path_factory):
    """The clients' conversations through the batch job's multi-turn form: the oracle."""
    root = tmp_path_factory.mktemp("serve-batch")
    lines = [json.dumps({"id": i, "turns": conversation(i)}) for i in range(16)]
    (root / "in.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "tp_infer.generate", "--ckpt-path", str(chat_ckpt), *OPTIONS, "--ignore-eos"]
    cmd += ["--input-file", str(root / "in.jsonl"), "--output-file", str(root / "out.jsonl")]
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    return {r["id"]: [t["text"] for t in r["turns"]] for r in records}


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_chat_completions_and_models_through_the_openai_client(server, batch_replies):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": USERS[0]}]
    reply = chat(client, messages)
    assert reply.choices[0].message.content == batch_replies[6][0]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    stream = chat(client, messages, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == batch_replies[6][0]
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1, "all but the last"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_text_completions_with_text_and_token_ids(server):
    client = server.client()
    by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8, 9], max_tokens=5, temperature=0)
    again = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8, 9], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == again.choices[0].text and by_ids.usage.completion_tokens == 5
    assert again.usage.prompt_tokens_details.cached_tokens == 4
    text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert text.usage.prompt_tokens >= 2 and text.usage.completion_tokens == 4
    streamed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_sixteen_concurrent_clients_find_their_history_in_the_cache(server, batch_replies):
    """Each client sends its whole conversation every turn, as chat apps do; replies equal the batch job's, and
    from the second turn on only the new tokens are computed."""
    client = server.client(timeout=120)

    def converse(i: int) -> list:
        messages, turns = [], []
        for user in conversation(i):
            messages.append({"role": "user", "content": user})
            reply = chat(client, messages)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            turns.append(reply)
        return turns

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(converse, range(16)))
    for i, turns in enumerate(results):
        assert [t.choices[0].message.content for t in turns] == batch_replies[i], f"client {i}"
        for before, turn in itertools.pairwise(turns):
            history = before.usage.prompt_tokens + before.usage.completion_tokens
            # a client whose conversation another holds may find the other's next turn cached too
            cached = turn.usage.prompt_tokens_details.cached_tokens
            assert history <= cached < turn.usage.prompt_tokens, f"client {i}"
            if i < 4:  # conversations no other client holds
                assert cached == history, f"client {i}"


def test_a_client_that_disconnects_releases_its_turn(server, batch_replies):
    def idle() -> bool:
        running = server.metric("tp_infer_running_turns") + server.metric("tp_infer_waiting_turns")
        return running == 0 and server.metric("tp_infer_pool_blocks_used") == server.metric(
            "tp_infer_pool_blocks_cached"
        )

    assert idle()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 200, "stream": True}
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(chat, server.client(), [{"role": "user", "content": USERS[0]}])
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(4), strict=False) if line.startswith("data:")) >= 2
            assert server.metric("tp_infer_running_turns") >= 1
        # the connection is closed here, in mid-stream
        assert other.result().choices[0].message.content == batch_replies[6][0]
    deadline = time.monotonic() + 20
    while not idle() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idle(), "the disconnected turn still holds its blocks"
    assert server.metric("tp_infer_generated_tokens_total") > 0


def ask(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields}


BAD_REQUESTS = [
    # (what, path, body or raw bytes, status, what the message must name)
    ("bad JSON", "chat/completions", b'{"model": "ckpt", "messages": [', 400, "not valid JSON"),
    ("no messages", "chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "chat/completions", ask(messages=[]), 400, "messages"),
    ("unknown role", "chat/completions", ask(messages=[{"role": "wizard", "content": "x"}]), 400, "wizard"),
    ("content not text", "chat/completions", ask(messages=[{"role": "user", "content": 3}]), 400, "content"),
    ("unknown field", "chat/completions", ask(temprature=1), 400, "temprature"),
    ("temperature too high", "chat/completions", ask(temperature=5), 400, "temperature"),
    ("negative top_p", "chat/completions", ask(top_p=-1), 400, "top_p"),
    ("max_tokens 0", "chat/completions", ask(max_tokens=0), 400, "max_tokens"),
    ("n 2", "chat/completions", ask(n=2), 400, "n=2"),
    ("penalty", "chat/completions", ask(presence_penalty=1), 400, "presence_penalty"),
    ("logprobs", "chat/completions", ask(logprobs=True), 400, "logprobs"),
    ("tools", "chat/completions", ask(tools=[{}]), 400, "tools"),
    ("too many stops", "chat/completions", ask(stop=list("abcde")), 400, "stop"),
    ("wrong model", "chat/completions", ask(model="gpt-4"), 404, "gpt-4"),
    ("too long", "chat/completions", ask(messages=[{"role": "user", "content": "x " * 400}]), 400, "max_seq_len"),
    ("max_tokens past max_seq_len", "chat/completions", ask(max_tokens=300), 400, "max_seq_len"),
    ("stream_options without stream", "chat/completions", ask(stream_options={"include_usage": True}), 400, "stream"),
    ("token id out of vocabulary", "completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "99999"),
    ("empty prompt", "completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("several prompts", "completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
    ("echo", "completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize(("what", "path", "body", "status", "named"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_answered_and_the_server_goes_on(server, what, path, body, status, named):
    url = f"{server.url}/v1/{path}"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"] or named == error["param"], error
    assert error["type"] and "\n" not in error["message"]
    ok = chat(server.client(), [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_an_api_key_guards_every_endpoint_but_health(chat_ckpt):
    s = Server(1, chat_ckpt, "--api-key", "s3cret")
    try:
        assert httpx.get(f"{s.url}/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}):
            for path in ("/v1/models", "/metrics"):
                response = httpx.get(f"{s.url}{path}", headers=headers)
                assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            chat(s.client(api_key="wrong"), [{"role": "user", "content": "x"}])
        assert chat(s.client(api_key="s3cret"), [{"role": "user", "content": "x"}], max_tokens=2).choices
    finally:
        s.stop()


def test_killing_a_follower_ends_the_server(chat_ckpt):
    s = Server(2, chat_ckpt)
    ranks = rank_pids(s.proc.pid, 2)
    assert chat(s.client(), [{"role": "user", "content": "x"}], max_tokens=2).choices
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        s.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_all({s.proc.pid, *ranks.values()})
        pytest.fail("the server outlived a killed follower by 60 s")
    assert s.proc.returncode != 0 and time.monotonic() - killed < 60
    assert_gone(set(ranks.values()))
    s.log.close()
