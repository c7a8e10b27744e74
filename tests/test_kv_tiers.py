"""The tiers under the KV pool, as rank 0 keeps them without a model: the host tier's and the disk tier's LRU indexes,
block keys chained over whole prefixes, and the block manager's transfers between the pool, host memory and disk. A
small data model stands in for the ranks: it runs every transfer in order as ModelRunner.transfer does, then the
block copies, then the forward's writes, so that each test can check what every block, slot and file really holds."""

import itertools
import random
from collections import Counter

import pytest
import torch
from test_kv_tree import path_tokens

from tp_infer.engine.runner import copies_together
from tp_infer.kv.manager import BlockManager
from tp_infer.kv.pool import KVPool
from tp_infer.kv.tiers import KEY_BYTES, DiskTier, HostTier, Transfer, block_key, make_tiers, root_key

BS = 4
FINGERPRINT = "test-model"
ROOT = root_key(FINGERPRINT)
EMPTY = (None,) * BS
DEMOTE, PROMOTE, SAVE_HOST, SAVE_POOL, LOAD, DELETE = Transfer


# ---------------------------------------------------------------------------------------------------------- helpers


def chain_key(path) -> bytes:
    """The key of the block that ends `path` (a whole token prefix), chained from the root block by block."""
    key = ROOT
    for i in range(0, len(path), BS):
        key = block_key(key, tuple(path[i : i + BS]))
    return key


def block_data(path) -> tuple:
    """What the block ending `path` holds once computed: position p's cache depends on the tokens [0, p]."""
    start = (len(path) - 1) // BS * BS
    return tuple(tuple(path[: p + 1]) for p in range(start, len(path)))


def holds(cells: tuple, path) -> bool:
    """Whether a block's cells hold the data of the block ending `path` (cells past its tokens do not matter)."""
    want = block_data(path)
    return cells[: len(want)] == want


class Data:
    """What every pool block, host slot and file holds: a cell per position, the token prefix it was computed from.
    run() executes a plan as the ranks do: the transfers strictly in order, then the block copies, all sources read
    before any destination is written."""

    def __init__(self, num_blocks: int, host_slots: int, files: dict | None = None):
        self.pool = [EMPTY] * num_blocks
        self.host = [EMPTY] * host_slots
        self.files = {} if files is None else files
        self.counts = Counter()

    def run(self, transfers, copies=(), fail=frozenset()) -> list[bool]:
        """Returns, for each LOAD, whether it could read its file (missing files fail, and the keys in `fail`: a
        corrupt file)."""
        loaded = []
        for op, a, b, key in transfers:
            self.counts[op.name] += 1
            if op == DEMOTE:
                self.host[b] = self.pool[a]
            elif op == PROMOTE:
                self.pool[b] = self.host[a]
            elif op == SAVE_HOST:
                self.files[key] = self.host[a]
            elif op == SAVE_POOL:
                self.files[key] = self.pool[a]
            elif op == LOAD:
                ok = key in self.files and key not in fail
                if ok:
                    self.host[b] = self.files[key]
                self.counts["LOAD ok" if ok else "LOAD failed"] += 1
                loaded.append(ok)
            elif op == DELETE:
                self.files.pop(key, None)
            else:
                raise AssertionError(f"unknown transfer {op}")
        sources = [self.pool[s] for s, _ in copies]
        for (_, d), cells in zip(copies, sources, strict=True):
            self.pool[d] = cells
        return loaded

    def write(self, blocks: list[int], tokens, start: int, end: int) -> None:
        """The forward: positions [start, end) of a turn, into its blocks."""
        for p in range(start, end):
            block = blocks[p // BS]
            cells = list(self.pool[block])
            cells[p % BS] = tuple(tokens[: p + 1])
            self.pool[block] = tuple(cells)


def tiers(host: int = 8, disk: int | None = None, on_disk=None):
    """Tiers of `host` slots and, unless disk is None, a disk tier of `disk` blocks (empty, or with on_disk)."""
    on_disk = on_disk if on_disk is not None else ([] if disk is not None else None)
    return make_tiers(FINGERPRINT, host, disk or 0, on_disk)


def run_plan(m: BlockManager, data: Data, rows=(), fail=frozenset()) -> tuple[list, list[bool]]:
    """Run what the manager decided, as the engine's step does: transfers, copies, then the rows' writes; the copies'
    sources are let go of after. Returns the transfers and the LOAD results."""
    transfers, copies = m.take_transfers(), m.take_copies()
    loaded = data.run(transfers, copies, fail)
    for blocks, tokens, start, end in rows:
        data.write(blocks, tokens, start, end)
    m.copies_done(copies)
    return transfers, loaded


def cache(m: BlockManager, data: Data, tokens, cached=None):
    """A whole turn over `tokens`: admitted, its plan run and computed up to `cached` (all by default), released."""
    cached = len(tokens) if cached is None else cached
    adm = m.admit(tokens, cached, True)
    assert adm is not None
    assert m.grow(adm.table, cached)
    run_plan(m, data, [(adm.table.blocks, tokens, adm.reused, cached)])
    m.commit(adm.table, tokens, cached)
    m.release(adm.table, tokens, cached, keep=True)
    return adm


def node_at(m: BlockManager, path):
    """The tree node whose whole token path is `path`."""
    (node,) = [n for n in m.tree.nodes() if path_tokens(n) == tuple(path)]
    return node


def check_data(m: BlockManager, data: Data) -> None:
    """Every tree node's block holds the data of its token path, and its key names that path."""
    for node in m.tree.nodes():
        path = path_tokens(node)
        assert node.key == chain_key(path)
        assert holds(data.pool[node.block], path), path


# ------------------------------------------------------------------------------------------------------ block keys


def test_block_key_names_the_whole_prefix():
    a, b = block_key(ROOT, (1, 2, 3, 4)), block_key(ROOT, (9, 9, 9, 9))
    assert len(a) == KEY_BYTES and a == block_key(ROOT, [1, 2, 3, 4]) and a != b
    assert block_key(a, (5, 6)) != block_key(b, (5, 6))  # the same tokens under other parents
    assert block_key(a, (5, 6)) != block_key(a, (6, 5)) != block_key(a, (5, 6, 0))
    assert block_key(ROOT, (1, 2)) != block_key(ROOT, (1, 2, 0)) != block_key(ROOT, (258,))
    assert block_key(ROOT, (-1,)) != block_key(ROOT, (2**63 - 1,))
    assert root_key("a") != root_key("b") and root_key("a") == root_key("a") and len(root_key("a")) == KEY_BYTES
    assert block_key(root_key("a"), (1,)) != block_key(root_key("b"), (1,))  # another model's cache is another key


def test_tree_nodes_carry_chained_keys():
    m = BlockManager(16, BS, tiers())
    data = Data(16, 8)
    assert m.tree.root.key == ROOT
    cache(m, data, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    cache(m, data, [9, 9, 9, 9, 5, 6, 7, 8, 9, 10])  # the same later blocks under another first block
    keys = [n.key for n in m.tree.nodes()]
    assert len(set(keys)) == len(keys) == 6
    for node in m.tree.nodes():
        assert node.key == chain_key(path_tokens(node)) == block_key(node.parent.key, node.tokens)
    # without tiers the tree keys from a fixed root, the same for every prompt
    plain = BlockManager(4, BS)
    assert plain.tree.root.key == bytes(KEY_BYTES) and plain.tiers is None and plain.tree.on_evict is None


# ------------------------------------------------------------------------------------------------------- host tier


def test_host_tier_put_evicts_the_oldest_first():
    host = HostTier(3)
    k = [bytes([i]) * KEY_BYTES for i in range(6)]
    entries = []
    for key in k[:3]:
        entry, evicted = host.put(key)
        assert evicted == [] and entry.key == key and not entry.from_disk
        entries.append(entry)
    assert [e.slot for e in entries] == [0, 1, 2] and len(host) == 3 and not host.free
    assert all(key in host for key in k[:3]) and k[3] not in host
    entry, evicted = host.put(k[3], from_disk=True)
    assert evicted == [entries[0]] and entry.slot == entries[0].slot and entry.from_disk
    assert k[0] not in host and list(host.entries) == [k[1], k[2], k[3]]
    host.touch([k[1]])  # now the newest: k[2] is the oldest
    entry, evicted = host.put(k[4])
    assert evicted == [entries[2]] and entry.slot == 2 and list(host.entries) == [k[3], k[1], k[4]]
    host.touch([k[3], k[1], bytes(KEY_BYTES)])  # the first key newest; unknown keys are ignored
    assert list(host.entries) == [k[4], k[1], k[3]]
    with pytest.raises(AssertionError):
        host.put(k[1])  # already there
    assert sorted(e.slot for e in host.entries.values()) == [0, 1, 2]


def test_host_tier_take_put_back_release():
    host = HostTier(2)
    a, _ = host.put(b"a" * KEY_BYTES)
    b, _ = host.put(b"b" * KEY_BYTES)
    taken = host.take(a.key)
    assert taken is a and a.key not in host and len(host) == 1 and not host.free  # the slot stays reserved
    entry, evicted = host.put(b"c" * KEY_BYTES)  # room only by evicting b: a's slot is not given
    assert evicted == [b] and entry.slot == b.slot
    host.put_back(a)  # could not be copied after all: indexed again, as the newest
    assert list(host.entries) == [b"c" * KEY_BYTES, a.key] and host.entries[a.key] is a
    host.release(host.take(a.key).slot)
    assert list(host.free) == [a.slot] and len(host) == 1
    entry, evicted = host.put(b"d" * KEY_BYTES)
    assert evicted == [] and entry.slot == a.slot
    with pytest.raises(KeyError):
        host.take(b"z" * KEY_BYTES)


# ------------------------------------------------------------------------------------------------------- disk tier


def test_disk_tier_add_evict_touch_remove():
    k = [bytes([i]) * KEY_BYTES for i in range(6)]
    disk = DiskTier(3)
    assert len(disk) == 0 and disk.add(k[0]) == [] and disk.add(k[1]) == [] and disk.add(k[2]) == []
    assert disk.add(k[3]) == [k[0]] and k[0] not in disk and len(disk) == 3
    assert disk.add(k[1]) == [] and list(disk.index) == [k[2], k[3], k[1]]  # written again: the newest
    disk.touch([k[2], k[3]])  # the first key newest
    assert list(disk.index) == [k[1], k[3], k[2]]
    disk.touch([k[5]])
    assert list(disk.index) == [k[1], k[3], k[2]]
    disk.remove(k[3])
    disk.remove(k[5])  # not there: nothing happens
    assert list(disk.index) == [k[1], k[2]] and disk.evict_over() == []
    # keys found at start beyond the capacity: the oldest go, on evict_over()
    disk = DiskTier(2, k[:5])
    assert len(disk) == 5 and disk.evict_over() == k[:3] and list(disk.index) == k[3:5]
    assert DiskTier(0).add(k[0]) == [k[0]]


def test_make_tiers():
    assert make_tiers(FINGERPRINT, 0, 10, None) is None  # neither
    t = make_tiers(FINGERPRINT, 4, 0, None)
    assert t.root == ROOT and t.host.num_slots == 4 and t.disk is None
    t = make_tiers(FINGERPRINT, 0, 3, [b"x" * KEY_BYTES])
    assert t.host is None and t.disk.capacity == 3 and list(t.disk.index) == [b"x" * KEY_BYTES]
    t = make_tiers("other", 2, 3, [])
    assert t.root != ROOT and len(t.disk) == 0


# ------------------------------------------------------------------------------------------ the manager with tiers


def test_an_evicted_leaf_is_demoted_and_promoted_back():
    m = BlockManager(4, BS, tiers(host=4))
    data = Data(4, 4)
    a = list(range(1, 9))
    cache(m, data, a)
    second = node_at(m, a)
    block, key = second.block, second.key
    assert m.tree.evict(1) == 1 and not second.attached
    transfers, _ = run_plan(m, data)
    assert transfers == [(DEMOTE, block, 0, key)]
    assert list(m.tiers.host.entries) == [key] and holds(data.host[0], a)
    prompt = [*a, 0]
    adm = m.admit(prompt, 1, True)
    assert adm.reused == 8 and adm.from_host == 4 and adm.from_disk == 0 and adm.copied == 0
    restored = node_at(m, a)
    assert adm.table.blocks[:2] == [node_at(m, a[:4]).block, restored.block] and adm.table.committed == 2
    transfers, _ = run_plan(m, data, [(adm.table.blocks, prompt, 8, 9)])
    assert transfers == [(PROMOTE, 0, restored.block, key)] and restored.key == key
    assert len(m.tiers.host) == 0 and sorted(m.tiers.host.free) == [0, 1, 2, 3] and m.restored_blocks == 1
    assert holds(data.pool[restored.block], a)
    assert m.allocator.refs[restored.block] == 2  # the tree and the turn: the restore's own hold is gone
    m.release(adm.table, prompt, 9, keep=True)
    check_data(m, data)


def test_a_promoted_slot_is_reused_only_after_it_was_read():
    m = BlockManager(4, BS, tiers(host=2))
    data = Data(4, 2)
    a = list(range(1, 13))  # three blocks
    c = [7] * 8
    cache(m, data, a)
    assert m.tree.evict(2) == 2  # a's last two blocks: slots 0 and 1
    run_plan(m, data)
    cache(m, data, c)  # two of the three free blocks: one is left
    prompt = [*a, 0]
    adm = m.admit(prompt, 1, True)
    assert adm.reused == 12 and adm.from_host == 8
    c1, c0 = chain_key(c), chain_key(c[:4])
    transfers, _ = run_plan(m, data, [(adm.table.blocks, prompt, 12, 13)])
    ops = [(op, a_, b_) for op, a_, b_, _ in transfers]
    # the first promotion frees slot 1, which the demotion of c's leaf (for the second promotion's block) reuses
    assert [op for op, _, _ in ops] == [PROMOTE, DEMOTE, PROMOTE, DEMOTE]
    assert ops[0][1] == 1 and ops[1][2] == 1 and ops[2][1] == 0 and ops[3][2] == 0
    assert transfers[1][3] == c1 and transfers[3][3] == c0 and ops[2][2] == ops[1][1]
    for i in range(1, 4):
        assert holds(data.pool[adm.table.blocks[i - 1]], a[: 4 * i])
    assert holds(data.host[1], c) and holds(data.host[0], c[:4])
    assert list(m.tiers.host.entries) == [c1, c0]
    m.release(adm.table, prompt, 13, keep=True)
    check_data(m, data)


def test_host_eviction_spills_to_disk_unless_there_already():
    m = BlockManager(8, BS, tiers(host=2, disk=8))
    data = Data(8, 2)
    convs = [[i] * 4 for i in range(1, 5)]
    for conv in convs:
        cache(m, data, conv)
    assert m.tree.evict(3) == 3  # the three oldest: the host tier takes two, the first spills
    transfers, _ = run_plan(m, data)
    k = [chain_key(conv) for conv in convs]
    assert [(op, key) for op, _, _, key in transfers] == [
        (DEMOTE, k[0]),
        (DEMOTE, k[1]),
        (SAVE_HOST, k[0]),
        (DEMOTE, k[2]),
    ]
    assert transfers[2][1] == transfers[0][2] == transfers[3][2]  # saved from the slot before it is reused
    assert list(m.tiers.disk.index) == [k[0]] and holds(data.files[k[0]], convs[0])
    assert list(m.tiers.host.entries) == [k[1], k[2]]
    assert m.flush() == 3  # the host's two and the tree's one
    transfers, _ = run_plan(m, data)
    assert [(op, key) for op, _, _, key in transfers] == [(SAVE_HOST, k[1]), (SAVE_HOST, k[2]), (SAVE_POOL, k[3])]
    assert m.flush() == 0 and m.take_transfers() == []
    cache(m, data, [5] * 4)
    assert m.tree.evict(2) == 2  # both on disk already: evicting host entries writes nothing
    transfers, _ = run_plan(m, data)
    assert [op for op, _, _, _ in transfers] == [DEMOTE, DEMOTE]
    assert list(m.tiers.host.entries) == [k[3], chain_key([5] * 4)] and len(m.tiers.disk) == 4
    for key in m.tiers.disk.index:
        assert holds(data.files[key], convs[k.index(key)])


def test_disk_over_capacity_deletes_the_oldest_files():
    old = [chain_key([i] * 4) for i in range(10, 15)]
    files = {key: block_data([i] * 4) for i, key in zip(range(10, 15), old, strict=True)}
    m = BlockManager(8, BS, tiers(host=1, disk=3, on_disk=old))  # an earlier job's five files, oldest first
    data = Data(8, 1, files)
    transfers, _ = run_plan(m, data)
    assert transfers == [(DELETE, 0, 0, old[0]), (DELETE, 0, 0, old[1])]
    assert set(data.files) == set(old[2:]) == set(m.tiers.disk.index)
    cache(m, data, [1] * 4)
    cache(m, data, [2] * 4)
    assert m.tree.evict(2) == 2
    transfers, _ = run_plan(m, data)
    k1 = chain_key([1] * 4)
    assert [(op, key) for op, _, _, key in transfers] == [
        (DEMOTE, k1),
        (SAVE_HOST, k1),
        (DELETE, old[2]),
        (DEMOTE, chain_key([2] * 4)),
    ]
    assert list(m.tiers.disk.index) == [old[3], old[4], k1] and set(data.files) == set(m.tiers.disk.index)


def next_job(m: BlockManager, data: Data, host: int, disk: int, num_blocks: int = 8):
    """A new job over the files the last one left (pool and host memory start empty)."""
    manager = BlockManager(num_blocks, BS, tiers(host=host, disk=disk, on_disk=list(m.tiers.disk.index)))
    return manager, Data(num_blocks, host, data.files)


def test_prefetch_loads_disk_only_blocks_and_admit_restores_them():
    m = BlockManager(8, BS, tiers(host=4, disk=16))
    data = Data(8, 4)
    a = list(range(1, 11))  # two full blocks and a tail of 2
    cache(m, data, a)
    assert m.flush() == 3
    run_plan(m, data)
    m, data = next_job(m, data, host=4, disk=16)
    assert m.take_transfers() == []
    prompt = [*a, 11, 12]
    assert m.prefetch(prompt, 0) == []  # no budget
    m.take_transfers()
    loads = m.prefetch(prompt, 8)
    keys = [chain_key(a[:4]), chain_key(a[:8]), chain_key(a)]
    assert [e.key for e in loads] == keys and all(e.from_disk for e in loads)
    transfers, ok = run_plan(m, data)
    assert transfers == [(LOAD, 0, e.slot, e.key) for e in loads] and ok == [True] * 3
    m.loaded(loads, ok)
    assert m.take_transfers() == [] and list(m.tiers.host.entries) == keys[::-1]  # the chain's first newest
    for e, n in zip(loads, (4, 8, 10), strict=True):
        assert holds(data.host[e.slot], a[:n])
    assert m.prefetch(prompt, 8) == [] and m.take_transfers() == []  # all in host memory already
    adm = m.admit(prompt, 2, True)
    assert adm.reused == 10 and adm.from_disk == 10 and adm.from_host == 0
    transfers, _ = run_plan(m, data, [(adm.table.blocks, prompt, 10, 12)])
    assert [op for op, *_ in transfers] == [PROMOTE] * 3 and len(m.tiers.host) == 0
    assert len(m.tiers.host.free) == 4
    # the turn took the restored tail over: its blocks hold the whole prompt
    for p in range(12):
        assert data.pool[adm.table.blocks[p // BS]][p % BS] == tuple(prompt[: p + 1])
    m.release(adm.table, prompt, 12, keep=True)
    check_data(m, data)


def test_a_failed_load_is_forgotten_and_deleted():
    m = BlockManager(8, BS, tiers(host=4, disk=16))
    data = Data(8, 4)
    a = list(range(1, 13))
    cache(m, data, a)
    m.flush()
    run_plan(m, data)
    m, data = next_job(m, data, host=4, disk=16)
    prompt = [*a, 0]
    loads = m.prefetch(prompt, 2)  # a budget of two loads: the first two blocks
    k = [chain_key(a[: 4 * i]) for i in (1, 2, 3)]
    assert [e.key for e in loads] == k[:2]
    _, ok = run_plan(m, data, fail={k[1]})  # the second file is corrupt
    assert ok == [True, False]
    m.loaded(loads, ok)
    assert list(m.tiers.host.entries) == [k[0]] and list(m.tiers.host.free) == [2, 3, loads[1].slot]
    assert k[1] not in m.tiers.disk and k[2] in m.tiers.disk
    assert m.take_transfers() == [(DELETE, 0, 0, k[1])]
    data.run([(DELETE, 0, 0, k[1])])
    assert set(data.files) == set(m.tiers.disk.index)
    adm = m.admit(prompt, 1, True)  # the chain stops where the file was lost: its third block is unreachable
    assert adm.reused == 4 and adm.from_disk == 4
    run_plan(m, data, [(adm.table.blocks, prompt, 4, 5)])
    assert holds(data.pool[adm.table.blocks[0]], a[:4])
    # a load whose entry the same prefetch evicted again (a host tier of one slot): failed, still forgotten
    m2 = BlockManager(8, BS, tiers(host=1, disk=16, on_disk=list(m.tiers.disk.index)))
    data2 = Data(8, 1, data.files)
    m2.take_transfers()
    loads = m2.prefetch([*a[:4], 50, 51, 52, 53, 54], 4)
    assert [e.key for e in loads] == [k[0]]
    _, ok = run_plan(m2, data2, fail={k[0]})
    m2.loaded(loads, ok)
    assert len(m2.tiers.host) == 0 and list(m2.tiers.host.free) == [0] and k[0] not in m2.tiers.disk


def test_flush_saves_pool_and_host_blocks_newest_first_when_the_cap_is_small():
    m = BlockManager(8, BS, tiers(host=4, disk=2))
    data = Data(8, 4)
    old, a, b = [3] * 4, list(range(1, 13)), [9] * 8
    cache(m, data, old)
    m.tree.evict(1)  # old goes to host memory
    run_plan(m, data)
    cache(m, data, a)
    cache(m, data, b)  # the newest
    assert m.flush() == 2
    transfers, _ = run_plan(m, data)
    # oldest first: the host's block, a's nodes (leaf first), then b's: only b's two fit
    assert [(op, key) for op, _, _, key in transfers] == [(SAVE_POOL, chain_key(b)), (SAVE_POOL, chain_key(b[:4]))]
    assert list(m.tiers.disk.index) == [chain_key(b), chain_key(b[:4])]
    for key, path in ((chain_key(b), b), (chain_key(b[:4]), b[:4])):
        assert holds(data.files[key], path)
    # with room for all, everything the disk lacks, each once
    m = BlockManager(8, BS, tiers(host=4, disk=16))
    data = Data(8, 4)
    cache(m, data, old)
    m.tree.evict(1)
    run_plan(m, data)
    cache(m, data, a)
    assert m.flush() == 4
    transfers, _ = run_plan(m, data)
    assert [op for op, *_ in transfers] == [SAVE_HOST, SAVE_POOL, SAVE_POOL, SAVE_POOL]
    assert set(m.tiers.disk.index) == {chain_key(old), *(chain_key(a[:n]) for n in (4, 8, 12))}
    assert m.flush() == 0
    assert BlockManager(4, BS).flush() == 0 and BlockManager(4, BS, tiers(host=2)).flush() == 0


def test_a_disk_tier_without_host_memory_only_flushes():
    m = BlockManager(4, BS, tiers(host=0, disk=8))
    data = Data(4, 0)
    assert m.tiers.host is None and m.tree.on_evict is None
    cache(m, data, [1] * 8)
    assert m.tree.evict(1) == 1 and m.take_transfers() == []  # dropped: nowhere to demote to
    assert m.prefetch([1] * 9, 4) == []
    assert m.flush() == 1
    transfers, _ = run_plan(m, data)
    assert transfers == [(SAVE_POOL, node_at(m, [1] * 4).block, 0, chain_key([1] * 4))]
    assert m.admit([1] * 9, 9, True).reused == 4


# ---------------------------------------------------------------------------------- regressions (bugs found here)


def test_restore_does_not_evict_the_node_it_restores_under():
    """The prompt's deepest full node in the tree is the oldest unheld leaf; restoring its child from host memory
    needs a block, and the eviction for it must not take that node (insert under a detached parent)."""
    m = BlockManager(3, BS, tiers(host=8))
    data = Data(3, 8)
    a = list(range(1, 9))
    cache(m, data, a)
    cache(m, data, [9] * 5)  # evicts a's second block into host memory; a's first is the oldest leaf now
    run_plan(m, data)
    prompt = [*a, 0]
    adm = m.admit(prompt, 1, True)
    assert adm is not None and adm.reused == 8 and adm.from_host == 4
    run_plan(m, data, [(adm.table.blocks, prompt, 8, 9)])
    for p in range(9):
        assert data.pool[adm.table.blocks[p // BS]][p % BS] == tuple(prompt[: p + 1])
    m.release(adm.table, prompt, 9, keep=True)
    check_data(m, data)


def test_restore_with_every_host_slot_reserved():
    """A host tier of one slot: restoring takes its only entry out, and the eviction for the block to restore into
    finds no slot to demote into (it went to disk instead, or is dropped without a disk)."""
    for disk in (None, 8):
        m = BlockManager(2, BS, tiers(host=1, disk=disk))
        data = Data(2, 1)
        cache(m, data, [1, 2, 3, 4, 5])
        cache(m, data, [9] * 5)  # the first conversation's blocks: its tail spills, its first block in host memory
        run_plan(m, data)
        assert list(m.tiers.host.entries) == [chain_key([1, 2, 3, 4])]
        prompt = [1, 2, 3, 4, 5, 6]
        adm = m.admit(prompt, 1, True)
        assert adm is not None and adm.reused >= 4 and adm.from_host == 4
        transfers, _ = run_plan(m, data, [(adm.table.blocks, prompt, adm.reused, adm.reused + 1)])
        for p in range(adm.reused + 1):
            assert data.pool[adm.table.blocks[p // BS]][p % BS] == tuple(prompt[: p + 1])
        assert len(m.tiers.host) + len(m.tiers.host.free) == 1
        if disk:
            assert (SAVE_POOL, chain_key([9] * 5)) in [(op, key) for op, _, _, key in transfers]
            assert holds(data.files[chain_key([9] * 5)], [9] * 5)
        m.release(adm.table, prompt, adm.reused + 1, keep=True)
        check_data(m, data)


def test_a_prefetched_chain_keeps_its_first_blocks_longest():
    """After a prefetch the chain's first block must be the newest in host memory: the blocks after it are useless
    without it (below() stops at the first block missing), so host evictions should take them first."""
    m = BlockManager(8, BS, tiers(host=3, disk=16))
    data = Data(8, 3)
    a = list(range(1, 9))
    cache(m, data, a)
    m.flush()
    run_plan(m, data)
    m, data = next_job(m, data, host=3, disk=16)
    loads = m.prefetch([*a, 0], 3)
    m.loaded(loads, run_plan(m, data)[1])
    assert list(m.tiers.host.entries) == [chain_key(a), chain_key(a[:4])]
    cache(m, data, [5] * 4)
    cache(m, data, [6] * 4)
    assert m.tree.evict(2) == 2  # the second demotion evicts the oldest host entry: a's second block
    run_plan(m, data)
    assert chain_key(a[:4]) in m.tiers.host and chain_key(a) not in m.tiers.host
    adm = m.admit([*a, 0], 1, True)
    assert adm.reused == 4 and adm.from_disk == 4


def test_a_prefetch_does_not_delete_the_files_it_loads():
    """The loads' host slots spill older entries to disk, and the disk's evictions for those must not take the files
    of the chain being read: the chain is touched on disk before the loads are decided."""
    m = BlockManager(8, BS, tiers(host=1, disk=3))
    data = Data(8, 1)
    a, x = list(range(1, 9)), [7] * 4
    cache(m, data, a)
    m.flush()
    cache(m, data, x)
    m.flush()
    run_plan(m, data)
    assert list(m.tiers.disk.index) == [chain_key(a), chain_key(a[:4]), chain_key(x)]
    m, data = next_job(m, data, host=1, disk=3)
    cache(m, data, [8] * 4)
    m.tree.evict(1)  # a host entry the disk lacks
    run_plan(m, data)
    loads = m.prefetch([*a, 0], 1)
    transfers, ok = run_plan(m, data)
    assert ok == [True] and [(op, key) for op, _, _, key in transfers] == [
        (SAVE_HOST, chain_key([8] * 4)),
        (DELETE, chain_key(x)),
        (LOAD, chain_key(a[:4])),
    ]
    m.loaded(loads, ok)
    assert chain_key(a) in m.tiers.disk and chain_key(a[:4]) in m.tiers.disk


# ------------------------------------------------------------------------------------------------------ random run


class Turn:
    def __init__(self, tokens, adm, reuse):
        self.tokens, self.table, self.cached, self.reuse = tokens, adm.table, adm.reused, reuse


def check(m: BlockManager, data: Data, turns: list[Turn], taken: list, paths: dict) -> None:
    """Every invariant of the bookkeeping, and every block, slot and file against the data it should hold."""
    alloc, tree, host, disk = m.allocator, m.tree, m.tiers.host, m.tiers.disk
    # the pool: no leak, no block held twice by the tree or written by two turns
    assert alloc.num_free + alloc.num_used == alloc.num_blocks and m.copies == []
    free = list(alloc.free)
    assert len(set(free)) == len(free) and set(free) == {b for b, r in enumerate(alloc.refs) if r == 0}
    nodes = tree.nodes()
    by_tree = Counter(n.block for n in nodes)
    assert all(c == 1 for c in by_tree.values()), "two nodes on one block"
    own = Counter(b for t in turns for b in t.table.blocks[t.table.committed :])
    assert all(c == 1 for c in own.values()) and not set(own) & set(by_tree), "a block written by two"
    holders = by_tree + Counter(b for t in turns for b in t.table.blocks) + Counter(s for s, _ in taken)
    assert alloc.refs == [holders[b] for b in range(alloc.num_blocks)]
    assert tree.num_nodes == len(nodes) and tree.cached_tokens == sum(len(n.tokens) for n in nodes)
    # the tree's blocks hold their paths' data, under keys naming those paths
    for node in nodes:
        path = path_tokens(node)
        assert node.attached and node.key == chain_key(path)
        assert paths.setdefault(node.key, path) == path
        assert holds(data.pool[node.block], path), ("tree node", path)
    # a running turn's blocks hold what it computed or reused, token-exact
    for t in turns:
        assert set(t.table.blocks[: t.table.committed]) <= set(by_tree)
        for p in range(t.cached):
            assert data.pool[t.table.blocks[p // BS]][p % BS] == tuple(t.tokens[: p + 1]), ("turn", t.tokens, p)
    # host memory: every slot free or an entry's (none reserved between operations), each entry's slot its data
    if host is not None:
        slots = [e.slot for e in host.entries.values()]
        assert len(host.free) + len(slots) == host.num_slots == len({*host.free, *slots})
        for key, entry in host.entries.items():
            assert entry.key == key and holds(data.host[entry.slot], paths[key]), ("host", paths[key])
    # disk: within the cap, a file for every key holding its data, and no file the index lost (but those a pending
    # DELETE removes next)
    if disk is not None:
        assert len(disk) <= disk.capacity
        for key in disk.index:
            assert key in data.files and holds(data.files[key], paths[key]), ("disk", paths[key])
        pending = {key for op, _, _, key in m.transfers if op == DELETE}
        assert set(data.files) - set(disk.index) <= pending, "a file leaked"
    assert all(op == DELETE for op, *_ in m.transfers)


def random_job(m: BlockManager, data: Data, rng: random.Random, steps: int, stats: Counter, paths: dict) -> None:
    """Random schedules (admits over colliding prompts, chunks, decodes, preemptions), releases, evictions,
    prefetches with failing files and flushes; every plan run through the data model, everything checked after."""
    vocab, bs = 3, BS
    prefixes = [[rng.randrange(vocab) for _ in range(n)] for n in (0, 5, 8, 11, 13, 17)]
    turns: list[Turn] = []
    taken: list[tuple[int, int]] = []  # copies run, their sources not yet let go of
    history: list[list[int]] = []
    waiting: list[list[int]] = []  # prompts prefetched, admitted first
    next_token = 1000
    demote = m.tree.on_evict

    def on_evict(node):  # what a DEMOTE (or a SAVE_POOL instead) will name
        paths.setdefault(node.key, path_tokens(node))
        stats["evicted while in host memory"] += node.key in m.tiers.host
        stats["evicted with every host slot reserved"] += not m.tiers.host.free and not len(m.tiers.host)
        demote(node)

    if demote is not None:
        m.tree.on_evict = on_evict
    can_prefetch = m.tiers.host is not None and m.tiers.disk is not None

    def prompt() -> list[int]:
        if waiting and rng.random() < 0.8:
            return waiting.pop(0)
        base = list(rng.choice(history if history and rng.random() < 0.5 else prefixes))
        return base + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]

    def end(turn: Turn, keep: bool) -> None:
        keep = keep and turn.reuse
        m.release(turn.table, turn.tokens, turn.cached, keep=keep)
        turns.remove(turn)
        if keep and turn.cached:
            history.append(turn.tokens[: turn.cached])
            del history[:-12]

    for _ in range(steps):
        op = rng.random()
        if op < 0.5:  # a step: admits and rows, one plan, then the results
            rows, admitted = [], []
            for _ in range(rng.choice((0, 1, 1, 2))):
                if len(turns) >= 6:
                    break
                tokens, reuse, chunk = prompt(), rng.random() < 0.9, rng.randint(1, 16)
                before = m.tree.match(tokens, len(tokens) - 1).length if reuse else 0
                adm = m.admit(tokens, chunk, reuse)
                if adm is None:
                    stats["admit failed"] += 1
                    continue
                assert before <= adm.reused < len(tokens) and (reuse or adm.reused == 0)
                assert adm.from_host + adm.from_disk <= adm.reused
                stats["admitted"] += 1
                stats["reused tokens"] += adm.reused
                stats["from host tokens"] += adm.from_host
                stats["from disk tokens"] += adm.from_disk
                stats["copies"] += adm.copied > 0
                turn = Turn(tokens, adm, reuse)
                turns.append(turn)
                admitted.append(turn)
                n = min(chunk, len(tokens) - adm.reused)
                assert len(turn.table.blocks) == m.blocks_for(adm.reused + n)
                rows.append((turn, n))
            for turn in [t for t in turns if t not in admitted]:
                if rng.random() < 0.5:
                    continue
                if turn.cached == len(turn.tokens):  # decode: last step's sampled token
                    if rng.random() < 0.5:
                        turn.tokens.append(rng.randrange(vocab))
                    else:
                        turn.tokens.append(next_token)
                        next_token += 1
                n = rng.randint(1, min(8, len(turn.tokens) - turn.cached))
                if m.grow(turn.table, turn.cached + n):
                    rows.append((turn, n))
                else:
                    stats["grow failed"] += 1
                    if rng.random() < 0.5:
                        end(turn, keep=True)  # preempted
            transfers, copies = m.take_transfers(), m.take_copies()
            data.run(transfers, copies)
            for turn in admitted:  # what it reused is its prompt's data, token-exact
                for p in range(turn.cached):
                    assert data.pool[turn.table.blocks[p // bs]][p % bs] == tuple(turn.tokens[: p + 1])
            for turn, n in rows:
                data.write(turn.table.blocks, turn.tokens, turn.cached, turn.cached + n)
            if rng.random() < 0.7:
                m.copies_done(copies)
            else:
                taken += copies
            for turn, n in rows:
                turn.cached += n
                if turn.reuse:
                    m.commit(turn.table, turn.tokens, turn.cached)
        elif op < 0.65 and turns:
            end(rng.choice(turns), keep=rng.random() < 0.85)
        elif op < 0.8 and can_prefetch:  # what the next admits will find: disk blocks into host memory
            tokens = prompt()
            budget = rng.randint(1, m.tiers.host.num_slots)
            loads = m.prefetch(tokens, budget)
            assert len(loads) <= budget and all(e.from_disk for e in loads)
            transfers = m.take_transfers()
            assert [t for t in transfers if t[0] == LOAD] == [(LOAD, 0, e.slot, e.key) for e in loads]
            ok = data.run(transfers, (), fail={e.key for e in loads if rng.random() < 0.2})
            m.loaded(loads, ok)
            stats["loads"] += len(loads)
            waiting.append(tokens)
            del waiting[:-3]
            if rng.random() < 0.5:
                data.run(m.take_transfers())  # else the DELETEs run first in the next plan
        elif op < 0.83:
            saved = m.flush()
            transfers = m.take_transfers()
            assert saved == sum(op in (SAVE_HOST, SAVE_POOL) for op, *_ in transfers)
            data.run(transfers)
            stats["flushes"] += 1
        elif op < 0.9:
            m.tree.evict(rng.randint(1, 3))
            data.run(m.take_transfers())
        else:
            m.copies_done(taken)
            taken = []
        check(m, data, turns, taken, paths)

    for turn in list(turns):
        end(turn, keep=rng.random() < 0.7)
    m.copies_done(taken)
    data.run(m.take_transfers())
    check(m, data, [], [], paths)


@pytest.mark.parametrize(
    "num_blocks, host_slots, disk_blocks",
    [(20, 8, 24), (10, 1, 6), (16, 6, None), (12, 3, 40)],
    ids=["host-and-disk", "one-host-slot", "host-only", "large-disk"],
)
def test_random_operations_against_a_data_model(num_blocks, host_slots, disk_blocks):
    """Two jobs of random operations over one disk (the second finds the first's files, as a restarted server
    does), an earlier job's files beyond the cap to start with; every plan is run through the data model and every
    block, slot and file checked after each operation."""
    rng = random.Random(20250101 + num_blocks)
    stats, paths = Counter(), {}
    files = {}
    on_disk = None
    if disk_blocks is not None:  # an earlier job's files, oldest first, more than the cap
        on_disk = []
        for _ in range(disk_blocks + 5):
            path = tuple(rng.randrange(3) for _ in range(rng.choice((4, 8, 12, 6))))
            key = chain_key(path)
            if key not in files:
                files[key], paths[key] = block_data(path), path
                on_disk.append(key)
    counts = Counter()
    for _job in range(2):
        m = BlockManager(num_blocks, BS, make_tiers(FINGERPRINT, host_slots, disk_blocks or 0, on_disk))
        data = Data(num_blocks, host_slots, files)
        data.run(m.take_transfers())  # the files beyond the cap
        check(m, data, [], [], paths)
        random_job(m, data, rng, 2000, stats, paths)
        if disk_blocks is not None:
            m.flush()
            data.run(m.take_transfers())
            check(m, data, [], [], paths)
            on_disk = list(m.tiers.disk.index)
        counts += data.counts
    print("random run:", dict(stats), dict(counts))
    for what in ("admitted", "admit failed", "grow failed", "copies", "reused tokens", "from host tokens"):
        assert stats[what] > 0, (what, dict(stats))
    for what in ("DEMOTE", "PROMOTE"):
        assert counts[what] > 0, (what, dict(counts))
    if disk_blocks is not None:
        for what in ("SAVE_HOST", "SAVE_POOL", "LOAD ok", "LOAD failed", "DELETE"):
            assert counts[what] > 0, (what, dict(counts))
        assert stats["from disk tokens"] > 0, dict(stats)


def test_flush_saves_a_block_both_in_host_memory_and_the_tree_once():
    """A demoted block computed again (the prompt that needed it stopped inside it) is both in host memory and in
    the tree: flush saves it once, counts it once, and it takes one place only when the cap is small."""
    m = BlockManager(8, BS, tiers(host=4, disk=2))
    data = Data(8, 4)
    cache(m, data, [1, 2, 3, 4, 5])
    assert m.tree.evict(2) == 2
    run_plan(m, data)
    cache(m, data, [1, 2, 3, 4])  # matches nothing below its last token: computes and commits the block again
    k, tail = chain_key([1, 2, 3, 4]), chain_key([1, 2, 3, 4, 5])
    assert k in m.tiers.host and node_at(m, [1, 2, 3, 4]).key == k
    assert m.flush() == 2
    transfers, _ = run_plan(m, data)
    assert sorted(key for _, _, _, key in transfers) == sorted([tail, k]) and len(transfers) == 2
    assert set(m.tiers.disk.index) == {tail, k} and set(data.files) == {tail, k}
    assert m.flush() == 0
    m = BlockManager(4, BS, make_tiers(FINGERPRINT, 2, 0, []))  # a disk tier of no blocks keeps nothing
    cache(m, Data(4, 2), [1, 2, 3, 4])
    assert m.flush() == 0 and m.take_transfers() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_moves_of_blocks_run_together_as_one_by_one(dtype):
    """copies_together joins consecutive DEMOTEs (or PROMOTEs) into one run while its destinations differ, and
    KVPool.copy_to of each run leaves the pool and the host tier as copying block by block does (FP8 scales too)."""
    rng = random.Random(11)
    moves = []
    while len(moves) < 300:  # stretches of one kind of move, as an eviction or a restore plans them
        op = rng.choice([DEMOTE, PROMOTE, SAVE_HOST])
        for _ in range(rng.randint(1, 8)):
            pool_block, host_block = rng.randrange(6), rng.randrange(5)
            moves.append([int(op), *((host_block, pool_block) if op == PROMOTE else (pool_block, host_block)), 0, 0])

    def pools() -> dict[str, KVPool]:
        torch.manual_seed(0)
        out = {}
        for name, blocks in (("pool", 6), ("host", 5)):
            out[name] = KVPool(2, blocks, BS, [(8,), (3,)], dtype, torch.device("cpu"))
            for part in out[name].named.values():
                part.copy_(torch.randn(part.shape).to(part.dtype))
        return out

    expected = pools()
    for op, a, b, _, _ in moves:
        source, target = {DEMOTE: ("pool", "host"), PROMOTE: ("host", "pool")}.get(Transfer(op), (None, None))
        if source:
            for name, part in expected[source].named.items():
                expected[target].named[name][b] = part[a]
    runs = copies_together(moves)
    assert sum(len(sources) for _, sources, _, _ in runs) == len(moves)
    assert any(len(sources) > 1 for op, sources, _, _ in runs if op == DEMOTE)
    assert any(len(sources) > 1 for op, sources, _, _ in runs if op == PROMOTE)
    ops = [op for op, _, _, _ in runs]
    assert any(op == after != SAVE_HOST for op, after in itertools.pairwise(ops)), "no run split at a repeated block"
    together = pools()
    for op, sources, destinations, _ in runs:
        assert len(set(destinations)) == len(destinations)
        if op in (DEMOTE, PROMOTE):
            source, target = ("pool", "host") if op == DEMOTE else ("host", "pool")
            together[source].copy_to(together[target], sources, destinations)
    for name in ("pool", "host"):
        for part, want in zip(together[name].named.values(), expected[name].named.values(), strict=True):
            assert torch.equal(part.view(torch.uint8), want.view(torch.uint8))
