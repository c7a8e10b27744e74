"""Issue 28 against the server, as a hostile or careless client would try it: every reproduction is answered with
OpenAI's error object (or, for sampling values the sampler can now take, a normal reply) and the server then answers
a normal chat as before; limits on bodies and messages; max_model_len as the config and pool allow; a client that
disconnects from a non-streaming request; a follower killed under in-flight streams; /openapi.json as the server
answers."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import test_server
from faulty_server import FAULT_TEMPERATURE
from processes import kill_all, rank_pids, torchrun
from test_server import MODEL, Server

BODY_LIMIT, MAX_MESSAGES = 100_000, 64
HELLO = [{"role": "user", "content": "Hello there,"}]


def ask(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def post(server: Server, body, path: str = "chat/completions", **kw) -> httpx.Response:
    url = f"{server.url}/v1/{path}"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60, **kw)
    return httpx.post(url, json=body, timeout=60, **kw)


def reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def assert_openai_error(response: httpx.Response, status: int, named: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "\n" not in error["message"] and error["type"]
    if named is not None:
        assert named in error["message"] or named == error["param"], error
    return error


def long_config(chat_ckpt: Path, tmp: Path) -> Path:
    """The checkpoint's config, made for 8192 positions: turns long enough to be caught in flight."""
    config = json.loads((chat_ckpt / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    path = tmp / "config-8192.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(chat_ckpt):
    """World size 1; --max-seq-len past what the config (256 positions) allows, small limits."""
    limits = ["--max-body-bytes", str(BODY_LIMIT), "--max-messages", str(MAX_MESSAGES), "--max-seq-len", "1024"]
    s = Server(1, chat_ckpt, "--ignore-eos", *limits)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server2(chat_ckpt, tmp_path_factory):
    """World size 2, with turns of up to 8192 tokens."""
    config = long_config(chat_ckpt, tmp_path_factory.mktemp("long"))
    s = Server(2, chat_ckpt, "--ignore-eos", "--config", str(config), "--max-seq-len", "8192")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def greedy(server) -> str:
    """The normal chat every reproduction is followed by, and its answer."""
    return reply(post(server, ask(temperature=0)))


# ---- sampling values that killed every rank: the sampler now takes them, or they are refused by name ----------------
SAMPLING_AS_GREEDY = [  # a nucleus too small to hold any token keeps the likeliest; a temperature that underflows
    ("top_p 1e-50", {"temperature": 1, "top_p": 1e-50}),
    ("top_p 5e-324", {"temperature": 1, "top_p": 5e-324}),
    ("temperature 1e-300", {"temperature": 1e-300}),
    ("temperature 1e-39", {"temperature": 1e-39, "top_p": 0.5}),
]
SAMPLING_REFUSED = [  # (what, raw body, status, param)
    ("seed 2**64", json.dumps(ask(seed=2**64)).encode(), 400, "seed"),
    ("seed -2**63-1", json.dumps(ask(seed=-(2**63) - 1)).encode(), 400, "seed"),
    ("seed 10**30 at temperature 0", json.dumps(ask(seed=10**30, temperature=0)).encode(), 400, "seed"),
    ("temperature NaN", b'{"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature"),
    ("top_p Infinity", b'{"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400,
     "top_p"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "fields"), SAMPLING_AS_GREEDY, ids=[c[0] for c in SAMPLING_AS_GREEDY])
@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_top_p_and_temperature_sample_the_likeliest_token(request, greedy, world_size, what, fields):
    s = request.getfixturevalue("server" if world_size == 1 else "server2")
    expected = greedy if world_size == 1 else reply(post(s, ask(temperature=0)))
    assert reply(post(s, ask(**fields))) == expected, what
    stream = post(s, ask(stream=True, **fields)).text
    assert stream.rstrip().endswith("data: [DONE]") and '"error"' not in stream
    assert reply(post(s, ask(temperature=0))) == expected
    assert httpx.get(f"{s.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(("what", "body", "status", "param"), SAMPLING_REFUSED, ids=[c[0] for c in SAMPLING_REFUSED])
@pytest.mark.parametrize("world_size", [1, 2])
def test_sampling_values_the_generator_cannot_take_are_refused_by_name(request, world_size, what, body, status, param):
    s = request.getfixturevalue("server" if world_size == 1 else "server2")
    error = assert_openai_error(post(s, body), status, param)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert reply(post(s, ask(temperature=0)))


# ---- bodies the server could not read, or that cost too much -----------------------------------------------------
def deep(depth: int) -> bytes:
    return b'{"model": "ckpt", "messages": ' + b"[" * depth + b"]" * depth + b"}"


BAD_BODIES = [  # (what, path, raw body, status, named)
    ("lone surrogate", "chat/completions", json.dumps(ask(messages=[{"role": "user", "content": "Hi \ud800 there"}]))
     .encode(), 400, "surrogate"),
    ("lone surrogate in a prompt", "completions", json.dumps({"model": MODEL, "prompt": "a\udfff"}).encode(), 400,
     "surrogate"),
    ("lone surrogate in a stop", "chat/completions", json.dumps(ask(stop=["\ud800"])).encode(), 400, "stop"),
    ("invalid UTF-8", "chat/completions", b'{"model": "ckpt", "messages": [{"role": "user", "content": "Hi \xff"}]}',
     400, "UTF-8"),
    ("40,000-deep JSON", "chat/completions", deep(40_000), 400, "nested too deeply"),
    ("500-deep JSON", "chat/completions", deep(500), 400, "messages"),
    ("not an object", "chat/completions", b"[1, 2]", 400, "JSON object"),
    ("too many messages", "chat/completions", json.dumps(ask(messages=HELLO * (MAX_MESSAGES + 1))).encode(), 400,
     "--max-messages"),
    ("body too large", "chat/completions", json.dumps(ask(messages=[{"role": "user", "content": "x" * BODY_LIMIT}]))
     .encode(), 413, "--max-body-bytes"),
    ("cache_salt empty", "chat/completions", json.dumps(ask(cache_salt="")).encode(), 400, "cache_salt"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "path", "body", "status", "named"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_unreadable_and_oversized_bodies_get_openai_errors(server, greedy, what, path, body, status, named):
    assert_openai_error(post(server, body, path), status, named)
    assert reply(post(server, ask(temperature=0))) == greedy


def test_a_chunked_body_past_the_limit_is_answered_413_as_it_arrives(server, greedy):
    sent = []

    def chunks():  # no content-length: the server counts what it reads
        for _ in range(100):
            sent.append(1)
            yield b" " * 10_000

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60)
    assert_openai_error(response, 413, "--max-body-bytes")
    assert reply(post(server, ask(temperature=0))) == greedy


def test_unknown_paths_and_methods_get_openai_errors(server, greedy):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404, "/v1/nothing")
    assert_openai_error(httpx.post(f"{server.url}/v1/models"), 405, "POST")
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions"), 405, "GET")
    assert reply(post(server, ask(temperature=0))) == greedy


def test_token_prompts_take_every_id_of_the_model_even_past_the_tokenizer(server, chat_ckpt):
    """The model's embedding may have more rows than the tokenizer has tokens (DeepSeek's do; so does the test
    checkpoint): a prompt of ids may hold any id the model has, and the first id past it is refused by name."""
    vocab = json.loads((chat_ckpt / "config.json").read_text())["vocab_size"]
    response = post(server, {"model": MODEL, "prompt": [1, 2, vocab - 1], "max_tokens": 2}, "completions")
    assert response.status_code == 200, response.text
    error = assert_openai_error(
        post(server, {"model": MODEL, "prompt": [1, vocab], "max_tokens": 2}, "completions"), 400, "prompt"
    )
    assert f"[0, {vocab})" in error["message"]


def test_as_many_messages_as_the_limit_are_served(server):
    pairs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * (MAX_MESSAGES // 2 - 1)
    messages = [{"role": "system", "content": "Be brief."}, *pairs, *HELLO]
    assert len(messages) == MAX_MESSAGES
    response = post(server, ask(messages=messages, max_tokens=2))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_max_model_len_is_what_the_config_and_pool_allow(server, server2):
    """The checkpoint's config says 256 positions: --max-seq-len 1024 cannot take the server past it."""
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["max_model_len"] == 256
    assert_openai_error(post(server, ask(max_tokens=300)), 400, "max_seq_len 256")
    assert httpx.get(f"{server2.url}/v1/models").json()["data"][0]["max_model_len"] == 8192


def cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_clients_with_different_cache_salts_never_see_each_others_prefixes(server):
    """The vault-code probe of issue 28: another salt finds nothing of a system prompt, the same salt all of it."""
    vault = [{"role": "system", "content": "The vault code is 7391."}, {"role": "user", "content": "What is it?"}]
    first = post(server, ask(messages=vault, cache_salt="tenant-a"))
    assert cached(first) == 0
    prompt = first.json()["usage"]["prompt_tokens"]
    guess = [vault[0], {"role": "user", "content": "Guess"}]
    assert cached(post(server, ask(messages=guess, cache_salt="tenant-b"))) == 0
    # the shared namespace holds what other tests' requests left there: the BOS token at most
    assert cached(post(server, ask(messages=guess))) <= 1
    assert cached(post(server, ask(messages=vault, cache_salt="tenant-a"))) == prompt - 1  # all but the last
    assert cached(post(server, ask(messages=vault, cache_salt="tenant-b"))) < prompt - 1


def test_a_request_without_a_cache_salt_is_refused_where_one_is_required(chat_ckpt):
    s = Server(1, chat_ckpt, "--require-cache-salt")
    try:
        assert_openai_error(post(s, ask()), 400, "cache_salt")
        assert reply(post(s, ask(cache_salt="tenant-a")))
    finally:
        s.stop()


def test_api_keys_folded_into_the_salt_keep_their_clients_apart(chat_ckpt):
    s = Server(1, chat_ckpt, "--api-key", "key-one", "--api-key", "key-two", "--salt-with-api-key")
    try:
        one, two = ({"authorization": f"Bearer {key}"} for key in ("key-one", "key-two"))
        assert_openai_error(post(s, ask(), headers={"authorization": "Bearer key-three"}), 401, "API key")
        secret = ask(messages=[{"role": "system", "content": "Ada's PIN is 4821."}, *HELLO])
        assert cached(post(s, secret, headers=one)) == 0
        assert cached(post(s, secret, headers=two)) == 0, "key-two found key-one's prompt"
        again = post(s, secret, headers=one)
        assert cached(again) == again.json()["usage"]["prompt_tokens"] - 1
        assert cached(post(s, {**secret, "cache_salt": "x"}, headers=one)) == 0
    finally:
        s.stop()


# ---- a client that goes away, a job that dies --------------------------------------------------------------------
def idle(s: Server) -> bool:
    running = s.metric("tp_infer_running_turns") + s.metric("tp_infer_waiting_turns")
    return running == 0 and s.metric("tp_infer_pool_blocks_used") == s.metric("tp_infer_pool_blocks_cached")


def test_a_non_streaming_client_that_disconnects_cancels_its_turn(server2):
    s = server2
    generated = s.metric("tp_infer_generated_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 8000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 20
    while not idle(s) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idle(s), "the disconnected turn still runs or holds its blocks"
    assert s.metric("tp_infer_generated_tokens_total") - generated < 4000, "the turn ran on after its client left"
    assert s.metric('tp_infer_requests_total{endpoint="chat",status="499"}') >= 1
    assert reply(post(s, ask(temperature=0)))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_turn_that_fails_in_the_engine_answers_its_client_alone(chat_ckpt, monkeypatch, world_size):
    """A turn whose sampling raises ends with a 500 error object (an error event, streaming); the turns beside it,
    the engine and the job go on, and its blocks are released."""
    script = str(Path(__file__).with_name("faulty_server.py"))  # takes the module Server puts in its command
    faulty = lambda n, *args: torchrun(n, "tp_infer.generate", *args, script=script)  # noqa: E731
    monkeypatch.setattr(test_server, "torchrun", faulty)
    s = Server(world_size, chat_ckpt, "--ignore-eos")
    try:
        expected = reply(post(s, ask(temperature=0, max_tokens=8)))
        poison = ask(temperature=FAULT_TEMPERATURE, max_tokens=8)
        results: dict = {}
        threads = [
            threading.Thread(target=lambda: results.update(whole=post(s, poison))),
            threading.Thread(target=lambda: results.update(stream=post(s, {**poison, "stream": True}))),
            threading.Thread(target=lambda: results.update(normal=post(s, ask(temperature=0, max_tokens=8)))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        error = assert_openai_error(results["whole"], 500, "injected fault in sampling")
        assert error["type"] == "server_error"
        events = [line.removeprefix("data: ") for line in results["stream"].text.splitlines() if line]
        assert events[-1] == "[DONE]" and "injected fault" in json.loads(events[-2])["error"]["message"], events
        assert reply(results["normal"]) == expected
        assert reply(post(s, ask(temperature=0, max_tokens=8))) == expected
        assert httpx.get(f"{s.url}/health").json() == {"status": "ok"}
        assert idle(s)
        assert s.metric('tp_infer_requests_total{endpoint="chat",status="500"}') == 2
    finally:
        s.stop()


def test_a_killed_follower_sends_every_client_an_error(chat_ckpt, tmp_path):
    """Streams in flight get an error event, a non-streaming request a 503 error object, within the collective
    timeout; then the job ends."""
    timeout = 10
    config = long_config(chat_ckpt, tmp_path)
    options = ["--config", str(config), "--max-seq-len", "8192", "--collective-timeout", str(timeout)]
    s = Server(2, chat_ckpt, "--ignore-eos", *options)
    ranks = rank_pids(s.proc.pid, 2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 8000}
    answers: dict = {}
    streaming = threading.Event()

    def stream(i: int) -> None:
        lines = []
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) >= 3:
                    streaming.set()
        answers[f"stream {i}"] = (time.monotonic(), lines)

    def whole() -> None:
        response = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
        answers["whole"] = (time.monotonic(), response)

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)] + [threading.Thread(target=whole)]
        for t in threads:
            t.start()
        assert streaming.wait(30)
        time.sleep(0.3)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(timeout + 20)
        assert set(answers) == {"stream 0", "stream 1", "whole"}
        for i in range(2):
            at, lines = answers[f"stream {i}"]
            assert at - killed < timeout + 5
            error = json.loads(lines[-2].removeprefix("data: ")) if len(lines) >= 2 else {}
            assert "error" in error and error["error"]["type"] == "server_error", lines[-3:]
            assert lines[-1] == "data: [DONE]"
        at, response = answers["whole"]
        assert at - killed < timeout + 5
        assert_openai_error(response, 503, "stopping")
        s.proc.wait(timeout=60)
        assert s.proc.returncode != 0
    finally:
        if s.proc.poll() is None:
            kill_all({s.proc.pid, *ranks.values()})
        s.log.close()


# ---- what /openapi.json says -------------------------------------------------------------------------------------
def test_openapi_describes_the_real_models_and_status_codes(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, model in (("/v1/chat/completions", "ChatCompletion"), ("/v1/completions", "Completion")):
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "500", "503"}
        for status in ("400", "401", "404", "413", "500", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == error
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "text/event-stream" in responses["200"]["content"]
    models = schema["paths"]["/v1/models"]["get"]["responses"]
    assert models["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelList"}
    parts = schema["components"]["schemas"]
    assert parts["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    assert "cache_salt" in parts["ChatCompletionRequest"]["properties"]
    assert parts["ChatCompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
