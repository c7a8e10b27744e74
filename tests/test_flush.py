"""The cache flush a gateway passes on to its replicas (SGLang's /flush_cache, smg's POST /flush_cache): every cached
block that no running turn holds is dropped, from the pool's prefix tree and from the host and disk tiers; what a
running turn holds stays, and the turn goes on undisturbed. Later turns find only what really is cached (cached_tokens
says so) and recompute the rest, to the same replies. First the block manager's books, then the server at world
sizes 1 and 2 through the `openai` client."""

import threading

import httpx
import pytest
from test_kv_tiers import BS, DELETE, Data, cache, chain_key, run_plan, tiers
from test_server import MODEL, Server

from tp_infer.kv.manager import BlockManager

# ------------------------------------------------------------------------------------------------ the block manager


def test_a_flush_drops_what_no_running_turn_holds_in_every_tier():
    m = BlockManager(12, BS, tiers(host=2, disk=8))
    data = Data(12, 2)
    convs = [[i] * BS for i in range(1, 5)]
    for conv in convs:
        cache(m, data, conv)
    assert m.tree.evict(3) == 3  # the three oldest move down: two to host memory, the first spills to disk
    run_plan(m, data)
    assert len(m.tiers.host) == 2 and len(m.tiers.disk) == 1
    salted = m.admit([7] * (2 * BS + 1), 2 * BS + 1, True, cache_salt="s")  # a salt's namespace, let go of
    m.grow(salted.table, 2 * BS + 1)
    m.release(salted.table, [7] * (2 * BS + 1), 2 * BS + 1)
    shared = convs[3] + [9] * BS  # a running turn on the last conversation's cached block: it holds that one
    running = m.admit([*shared, 10], BS, True)
    assert running.reused == BS and m.grow(running.table, 2 * BS)
    run_plan(m, data, [(running.table.blocks, [*shared, 10], BS, 2 * BS)])
    m.commit(running.table, [*shared, 10], 2 * BS)  # its own block is in the tree now, held by it

    dropped = m.drop_cache()

    assert (dropped.pool_blocks, dropped.host_blocks, dropped.disk_blocks) == (3, 2, 1)  # the salt's 3 blocks
    assert dropped.kept_tokens == 2 * BS == m.tree.cached_tokens
    assert [(op, key) for op, _, _, key in m.take_transfers()] == [(DELETE, chain_key(convs[0]))]
    assert len(m.tiers.host) == 0 and sorted(m.tiers.host.free) == [0, 1] and len(m.tiers.disk) == 0
    assert set(m.tree.roots) == {m.tree.root.key}  # the salt's empty namespace is forgotten
    assert m.allocator.num_used == 2  # the running turn's two blocks, nothing else
    for conv in convs[:3]:  # nothing of them anywhere: recomputed whole
        again = m.admit([*conv, 0], 1, True)
        assert (again.reused, again.from_host, again.from_disk) == (0, 0, 0)
        m.release(again.table, [*conv, 0], 0, keep=False)
    m.release(running.table, [*shared, 10], 2 * BS)  # the running turn ends: its history stays cached
    assert m.admit([*shared, 10, 11], 1, True).reused == 2 * BS
    assert m.drop_cache().pool_blocks == 0  # the admission above holds them: nothing to drop


# ----------------------------------------------------------------------------------------------------- the server

SYSTEM = "You are a helpful assistant of the Example company. Answer briefly. "
USERS = ["Hello there,", "My name is Ada", "how are you today?"]


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def server(request, chat_ckpt):
    s = Server(request.param, chat_ckpt, "--ignore-eos")
    yield s
    s.stop()


def flush(server: Server) -> dict:
    answer = httpx.post(f"{server.url}/flush_cache", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def turns(server: Server, users: list[str], messages: list | None = None, **kw) -> tuple[list, list]:
    """(messages, [(reply, usage)]) of a conversation that goes on from `messages` with `users`."""
    client, out = server.client(timeout=60), []
    messages = messages if messages is not None else [{"role": "system", "content": SYSTEM}]
    for text in users:
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6, **kw)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        out.append((reply.choices[0].message.content, reply.usage))
    return messages, out


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_after_a_flush_the_next_turn_recomputes_its_history_to_the_same_reply(server):
    _, expected = turns(server, USERS, extra_body={"cache_salt": "oracle"})  # the same conversation, cached apart
    messages, first = turns(server, USERS[:2])
    assert cached(first[1][1]) == first[0][1].prompt_tokens + first[0][1].completion_tokens  # its history cached
    assert server.metric("tp_infer_pool_cached_tokens") > 0
    dropped = flush(server)
    assert dropped["message"] == "Cache flushed." and dropped["pool_blocks"] > 0 and dropped["kept_tokens"] == 0
    assert server.metric("tp_infer_pool_cached_tokens") == 0
    _, last = turns(server, USERS[2:], messages)
    assert cached(last[0][1]) == 0  # nothing was left: the whole history computed again
    assert [text for text, _ in first + last] == [text for text, _ in expected]
    assert flush(server)["pool_blocks"] > 0 and flush(server)["pool_blocks"] == 0  # a second flush finds nothing
    assert httpx.get(f"{server.url}/flush_cache", timeout=30).status_code == 200  # SGLang answers GET too
    turns(server, USERS[:1])
    reset = httpx.post(f"{server.url}/reset_prefix_cache", timeout=30)  # vLLM's name for it
    assert reset.status_code == 200 and reset.json()["pool_blocks"] > 0


def test_a_flush_while_a_turn_streams_leaves_it_alone(server):
    ask = {"model": MODEL, "temperature": 0, "max_tokens": 150}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a long story."}]
    client = server.client(timeout=60)
    expected = client.chat.completions.create(messages=messages, extra_body={"cache_salt": "oracle"}, **ask)
    turns(server, ["Something else."])  # cache that no running turn holds
    stream = client.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **ask
    )
    pieces, usage, flushed, started = [], None, [], threading.Event()

    def flush_once_started() -> None:
        started.wait(timeout=60)
        flushed.append(flush(server))

    flusher = threading.Thread(target=flush_once_started)
    flusher.start()
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            started.set()
        usage = chunk.usage or usage
    flusher.join(timeout=60)
    (dropped,) = flushed
    assert dropped["pool_blocks"] > 0  # the other conversation's cache
    assert dropped["kept_tokens"] > 0  # what the streaming turn held when the flush came: it was running
    assert "".join(pieces) == expected.choices[0].message.content and usage.completion_tokens == 150
    # its next turn finds the whole history it went on committing after the flush
    messages.append({"role": "assistant", "content": "".join(pieces)})
    _, (after,) = turns(server, ["Thanks."], messages)
    assert cached(after[1]) == usage.prompt_tokens + usage.completion_tokens


def test_a_flush_reaches_host_memory_and_disk(chat_ckpt, tmp_path):
    """A pool of 10 blocks over 10 of host memory over a disk tier: the conversations' blocks move down as the pool
    fills, and on to disk as host memory fills. After the flush none is left in either, their files are deleted,
    the next turn finds nothing cached anywhere, and the replies are the same."""
    disk = tmp_path / "kv"
    tiers = ["--kv-cache-memory", "0.0001", "--kv-host-memory", "0.0001", "--kv-disk-path", str(disk)]
    server = Server(1, chat_ckpt, "--ignore-eos", *tiers)
    try:
        _, first = turns(server, USERS[:2])
        for i in range(12):  # other conversations push its blocks down to host memory, and on to disk
            turns(server, [f"Conversation {i}, please."])
        files = list(disk.rglob("*.safetensors"))
        assert server.metric("tp_infer_host_blocks") > 0 and server.metric("tp_infer_disk_blocks") == len(files) > 0
        dropped = flush(server)
        assert dropped["host_blocks"] > 0 and dropped["disk_blocks"] == len(files)
        assert server.metric("tp_infer_host_blocks") == server.metric("tp_infer_disk_blocks") == 0
        assert not any(f.exists() for f in files)
        _, last = turns(server, USERS[:2])
        assert cached(last[0][1]) == 0
        assert [text for text, _ in last] == [text for text, _ in first]
    finally:
        server.stop()
