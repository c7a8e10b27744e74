"""cache_salt keeps tenants' cached prefixes apart: a turn reuses only what turns of the same salt cached, in the pool,
host memory and on disk; no salt is the shared namespace of old; nothing the model computes changes."""

import random

import pytest
import rank_fns
from harness import run_ranks
from test_kv_tiers import BS, Data, holds, run_plan, tiers
from test_kv_tree import path_tokens

from tp_infer.chat import ReplyMemory
from tp_infer.engine.engine import Engine
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session
from tp_infer.kv.manager import BlockManager
from tp_infer.kv.tiers import block_key, root_key, salted_root

ROOT = root_key("test-model")
SYSTEM = list(range(1, 11))  # two full blocks of 4 and a tail of 2


def salted_key(path, salt, root: bytes = ROOT) -> bytes:
    """The key of the block ending `path`, chained from the salt's root."""
    key = salted_root(root, salt)
    for i in range(0, len(path), BS):
        key = block_key(key, tuple(path[i : i + BS]))
    return key


def tagged(tokens, salt) -> list[tuple]:
    """Tokens as the data model records them: tagged with the salt of the turn that computed them, so that a block
    reused across salts shows in the data (the manager sees the plain tokens)."""
    return [(salt, t) for t in tokens]


def turn(m: BlockManager, data: Data, tokens: list[int], salt, cached: int | None = None):
    """A whole turn under a salt: admitted, computed, committed and released, as the engine does."""
    cached = len(tokens) if cached is None else cached
    adm = m.admit(tokens, cached, True, salt)
    assert adm is not None and m.grow(adm.table, cached)
    run_plan(m, data, [(adm.table.blocks, tagged(tokens, salt), adm.reused, cached)])
    for p in range(adm.reused):  # what it reused is its own salt's data of its own prompt, token-exact
        assert data.pool[adm.table.blocks[p // BS]][p % BS] == tuple(tagged(tokens[: p + 1], salt))
    m.commit(adm.table, tokens, cached)
    m.release(adm.table, tokens, cached, keep=True)
    return adm


def root_of(node):
    while node.parent is not None:
        node = node.parent
    return node


def check_tree(m: BlockManager, data: Data, salts) -> None:
    """Every tree node's key is its path's under its own salt's root, and its block holds that salt's data."""
    base = m.tree.root.key
    salt_of = {salted_root(base, s): s for s in salts}
    for node in m.tree.nodes():
        salt = salt_of[root_of(node).key]
        assert node.key == salted_key(path_tokens(node), salt, base)
        assert holds(data.pool[node.block], tagged(path_tokens(node), salt))
    assert len({n.block for n in m.tree.nodes()}) == len(m.tree.nodes())


# ---------------------------------------------------------------------------------------------------- the keys


def test_salted_roots_differ_by_salt_and_from_the_shared_root():
    roots = [salted_root(ROOT, s) for s in (None, "", "a", "b", b"a", "é", "\ud800")]
    assert roots[0] == ROOT and roots[2] == roots[4], "a str salt and its UTF-8 bytes are one namespace"
    assert len({roots[i] for i in (0, 1, 2, 3, 5, 6)}) == 6
    assert salted_root(root_key("other model"), "a") != roots[2]
    assert block_key(roots[2], (1, 2, 3, 4)) != block_key(roots[3], (1, 2, 3, 4)) != block_key(ROOT, (1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------------- the tree


@pytest.mark.parametrize("with_tiers", [False, True])
def test_another_salts_prefix_is_never_matched_the_same_salt_shares(with_tiers):
    m = BlockManager(16, BS, tiers(host=8, disk=32) if with_tiers else None)
    data = Data(16, 8)
    turn(m, data, [*SYSTEM, 20, 21], "alice")
    assert turn(m, data, [*SYSTEM, 30], "bob").reused == 0
    assert turn(m, data, [*SYSTEM, 31], None).reused == 0
    assert turn(m, data, [*SYSTEM, 32], "").reused == 0, "an empty salt is not the shared namespace"
    assert turn(m, data, [*SYSTEM, 40], "alice").reused == len(SYSTEM)
    assert turn(m, data, [*SYSTEM, 41], "bob").reused == len(SYSTEM)
    assert turn(m, data, [*SYSTEM, 42], None).reused == len(SYSTEM)
    check_tree(m, data, ("alice", "bob", None, ""))


def test_an_empty_salt_namespace_is_forgotten_after_eviction():
    """A client sending a new salt each time leaves no root behind once its blocks are evicted."""
    m = BlockManager(4, BS)
    data = Data(4, 0)
    for i in range(20):
        turn(m, data, [i + 1] * 6, f"salt-{i}")
    assert len(m.tree.roots) <= 1 + 4
    m.tree.evict(4)
    assert list(m.tree.roots.values()) == [m.tree.root]


def test_the_salt_root_a_running_turn_holds_survives_its_eviction():
    """A turn whose salt's root lost every child (evicted) while it ran commits under the salt again."""
    m = BlockManager(8, BS)
    data = Data(8, 0)
    turn(m, data, [1, 2, 3, 4, 5], "a")
    adm = m.admit([9, 9, 9, 9, 9, 9], 6, True, "a")  # nothing shared: its table hangs from a's root
    m.tree.evict(8)
    assert salted_root(m.tree.root.key, "a") not in m.tree.roots
    run_plan(m, data, [(adm.table.blocks, tagged([9] * 6, "a"), 0, 6)])
    m.commit(adm.table, [9] * 6, 6)
    m.release(adm.table, [9] * 6, 6, keep=True)
    assert turn(m, data, [9, 9, 9, 9, 9, 9, 1], "a").reused == 6
    assert turn(m, data, [9, 9, 9, 9, 9, 9, 1], "b").reused == 0


# ---------------------------------------------------------------------------------------------------- the tiers


def evict_all(m: BlockManager, data: Data) -> None:
    m.tree.evict(m.num_blocks)
    run_plan(m, data)
    assert not m.tree.nodes()


def test_host_memory_restores_a_block_only_for_its_own_salt():
    m = BlockManager(8, BS, tiers(host=8))
    data = Data(8, 8)
    turn(m, data, [*SYSTEM, 20], "alice")
    evict_all(m, data)
    adm = turn(m, data, [*SYSTEM, 30], "bob")
    assert adm.reused == adm.from_host == 0
    evict_all(m, data)
    adm = turn(m, data, [*SYSTEM, 31], "alice")
    assert adm.reused == adm.from_host == 8, "its two full blocks (its tail ends in another token)"


def test_disk_restores_a_block_only_for_its_own_salt():
    """Blocks saved under one salt are never loaded for another, in a later job too."""
    m = BlockManager(8, BS, tiers(host=4, disk=32))
    data = Data(8, 4)
    turn(m, data, [*SYSTEM, 20], "alice")
    m.flush()
    run_plan(m, data)
    assert salted_key(SYSTEM[:8], "alice") in m.tiers.disk and salted_key(SYSTEM[:8], None) not in m.tiers.disk
    later = BlockManager(8, BS, tiers(host=4, disk=32, on_disk=list(m.tiers.disk.index)))
    data = Data(8, 4, data.files)
    for salt in ("bob", None):
        assert later.prefetch([*SYSTEM, 30], 4, salt) == [] and later.take_transfers() == []
        assert turn(later, data, [*SYSTEM, 30], salt).reused == 0
    loads = later.prefetch([*SYSTEM, 31], 4, "alice")
    assert [e.key for e in loads] == [salted_key(SYSTEM[:n], "alice") for n in (4, 8)]
    _, ok = run_plan(later, data)
    later.loaded(loads, ok)
    adm = turn(later, data, [*SYSTEM, 31], "alice")
    assert adm.reused == adm.from_disk == 8


def test_random_salted_turns_reuse_only_their_own_salts_blocks():
    """Random prompts over shared prefixes under three salts, through a small pool with host memory and disk: every
    reused token holds its own salt's data of its own prompt (turn() checks), every tree node its salt's."""
    rng = random.Random(28)
    m = BlockManager(6, BS, tiers(host=3, disk=12))
    data = Data(6, 3)
    prefixes = [[rng.randrange(3) for _ in range(n)] for n in (0, 4, 9)]
    reused = 0
    for _ in range(300):
        salt = rng.choice([None, "a", "b"])
        tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randint(1, 6))]
        loads = m.prefetch(tokens, 3, salt)
        _, ok = run_plan(m, data)
        m.loaded(loads, ok)
        reused += turn(m, data, tokens, salt).reused
        if rng.random() < 0.1:
            m.flush()
            run_plan(m, data)
        check_tree(m, data, (None, "a", "b"))
    assert reused > 300, "the same salt shares"


# ---------------------------------------------------------------------------------------------------- replies


def test_a_remembered_reply_is_recalled_only_under_its_salt():
    memory = ReplyMemory()
    memory.remember([5, 6], "hi", [7, 8], cache_salt="a")
    assert memory.recall([5, 6], "hi", cache_salt="a") == [7, 8]
    assert memory.recall([5, 6], "hi", cache_salt="b") is None and memory.recall([5, 6], "hi") is None
    memory.remember([5, 6], "hi", [9])
    assert memory.recall([5, 6], "hi") == [9] and memory.recall([5, 6], "hi", cache_salt="a") == [7, 8]


# ---------------------------------------------------------------------------------------------- the engine


GREEDY = SamplingParams(max_new_tokens=6, eos_token_ids=(1,))


def tenants(engine: Engine, system: list[int], questions: list[list[int]]) -> dict:
    """Clients behind one system prompt under salts, one after the other, then each prompt alone through an engine
    that reuses nothing: the turns' reused tokens and outputs, and the oracle's outputs."""
    plan = [("alice", 0), ("bob", 1), (None, 2), ("alice", 1), ("bob", 1), ("bob", 0), (None, 0)]
    out = []
    for i, (salt, q) in enumerate(plan):
        t = engine.generate(Session(f"t{i}", cache_salt=salt), system + questions[q], GREEDY)
        s = t.stats
        out.append(
            {"q": q, "reused": s.reused_tokens, "restored": s.host_tokens + s.disk_tokens, "generated": t.generated}
        )
    oracle = Engine(engine.runner, reuse=False, manager=engine.manager)
    alone = [
        oracle.generate(Session(f"o{q}"), system + question, GREEDY).generated for q, question in enumerate(questions)
    ]
    return {"turns": out, "alone": alone}


@pytest.mark.parametrize("tiered", [False, True], ids=["pool", "pool-host-disk"])
def test_tenants_see_only_their_own_salts_prefixes_and_outputs_are_unchanged(converted, tmp_path, tiered):
    rng = random.Random(5)
    system = [rng.randrange(2, 256) for _ in range(48)]  # three blocks: the tiers restore whole blocks
    questions = [[rng.randrange(2, 256) for _ in range(n)] for n in (7, 9, 5)]
    options = {"max_seq_len": 128, "max_batch_size": 2, "attn_impl": "absorb"}
    if tiered:  # a pool of two conversations: the others' blocks go to host memory and disk
        options.update(pool_tokens=128, host_tokens=64, disk_path=str(tmp_path / "kv"))
    (result,) = run_ranks(1, rank_fns.serve, str(converted["v3"]), options, tenants, system, questions)
    turns, alone = result["turns"], result["alone"]
    assert [t["reused"] for t in turns[:3]] == [0, 0, 0], "another salt's system prompt is never found"
    assert turns[3]["reused"] >= len(system), "the same salt shares its system prompt"
    if tiered:  # the tiers hold whole blocks and whole tails only
        assert turns[4]["reused"] >= len(system) and sum(t["restored"] for t in turns) >= len(system)
    else:
        assert turns[4]["reused"] == len(system) + len(questions[1]) - 1, "and its whole conversation"
    assert turns[5]["reused"] >= len(system) and turns[6]["reused"] >= len(system)
    for t in turns:
        assert t["generated"] == alone[t["q"]], t
    assert len({tok for t in alone for tok in t}) > 3, "a degenerate model would make this comparison vacuous"
