"""Rank 0's view of the pool: gives turns their blocks, finds their longest cached prefix, and gives what they computed
to the prefix tree.

A turn's block table, for a conversation of 40 tokens with block_size 16 that matched 20 cached tokens:

    position   0 ........ 15 | 16 .. 19 · 20 ....... 31 | 32 ..... 39
    block      tree node A   | own: 4 copied + computed  | own: computed
               (shared, held) \\ from the node that shared them

Blocks [0, committed) are the tree's nodes along the turn's path (immutable, shared); the rest are its own, written
only by it. As its own blocks fill they are committed to the tree, so other turns can share them at once; when the
turn ends its last, partial block joins the tree as a tail and the turn drops its references.

With tiers, what the tree evicts is demoted (to host memory, whose own evictions go to disk), and a turn's prompt is
looked up below the tree too: the blocks found in host memory are promoted back into the tree before the match,
those found on disk are first read into host memory by prefetch(). Each move is a transfer for every rank to run.

A turn's cache_salt (None: the shared namespace) picks the tree's root its prompt is matched under and its blocks are
committed under, and so the keys its blocks have in every tier: turns of different salts never share a block.
"""

from dataclasses import dataclass, field

from tp_infer.kv.blocks import BlockAllocator
from tp_infer.kv.radix import Node, PrefixTree
from tp_infer.kv.tiers import HostEntry, Tiers, Transfer, block_key


@dataclass(eq=False)
class BlockTable:
    """A turn's hold on the pool: blocks[i] holds its positions [i*bs, (i+1)*bs); `node` is the tree node of its
    block committed-1 (the root when none is)."""

    node: Node
    blocks: list[int] = field(default_factory=list)
    committed: int = 0


@dataclass
class Admission:
    table: BlockTable
    reused: int  # tokens found in the cache
    copied: int  # of which were copied from a block that matched only in part
    from_host: int = 0  # of which were promoted from host memory
    from_disk: int = 0  # of which were read from disk


@dataclass
class Restored:
    """The blocks restore() promoted into the tree along a prompt and the node they hang from (held till the match),
    and the promoted tokens."""

    pinned: list[int] = field(default_factory=list)
    from_host: int = 0
    from_disk: int = 0


@dataclass
class Dropped:
    """What a cache flush dropped: tree blocks of the pool, host memory blocks and disk files; and the tokens the
    tree still holds (running turns' prefixes)."""

    pool_blocks: int
    host_blocks: int
    disk_blocks: int
    kept_tokens: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, tiers: Tiers | None = None):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size}: must be a power of two")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tiers = tiers
        self.tree = PrefixTree(self.allocator, block_size, *([tiers.root] if tiers else []))
        if tiers is not None and tiers.host is not None:
            self.tree.on_evict = self.demote
        self.copies: list[tuple[int, int]] = []  # (source, destination) for the next forward, sources held till then
        self.transfers: list[tuple[Transfer, int, int, bytes]] = []  # for every rank to run before the copies
        self.restored_blocks = 0  # promoted into the pool from the tiers below, in all
        if tiers is not None and tiers.disk is not None:  # files beyond the cap, from an earlier job with a larger one
            self.transfers += [(Transfer.DELETE, 0, 0, key) for key in tiers.disk.evict_over()]

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int | None:
        """A free block, evicting the least recently used unheld tree leaf when there is none."""
        if self.allocator.num_free == 0:
            self.tree.evict(1)
        return self.allocator.allocate()

    def admit(
        self, tokens: list[int], first_chunk: int, reuse: bool, cache_salt: str | bytes | None = None
    ) -> Admission | None:
        """Blocks for a new turn over `tokens`: its longest cached prefix under its cache_salt (never the last token,
        whose logits choose the reply), and own blocks for its next min(first_chunk, rest) tokens. None when the pool
        cannot give them; the turn then holds nothing (eviction may have freed blocks meanwhile)."""
        bs, root = self.block_size, self.tree.namespace(cache_salt)
        restored = self.restore(tokens, len(tokens) - 1, root) if reuse and self.tiers else Restored()
        match = self.tree.match(tokens, len(tokens) - 1, root) if reuse else None
        for block in restored.pinned:  # the match holds what it uses from here on
            self.allocator.release(block)
        nodes = match.nodes if match else []
        partial, partial_len = (match.partial, match.partial_len) if match and match.partial_len else (None, 0)
        # the whole tail of a conversation that nobody else uses is taken over instead of copied
        take_over = (
            partial is not None and partial_len == len(partial.tokens) and self.allocator.refs[partial.block] == 1
        )
        held = [n.block for n in nodes] + ([partial.block] if partial else [])
        for block in held:  # held while allocating, so that eviction cannot take them
            self.allocator.share(block)
        reused = len(nodes) * bs + partial_len
        end = reused + min(len(tokens) - reused, first_chunk)
        own = []
        for _ in range(self.blocks_for(end) - len(nodes) - take_over):
            block = self.allocate()
            if block is None:
                for b in own + held:
                    self.allocator.release(b)
                if partial is not None:
                    self.tree.offer(partial)
                return None
            own.append(block)
        self.tree.touch(nodes + ([partial] if partial else []))
        table = BlockTable(nodes[-1] if nodes else root, [n.block for n in nodes], len(nodes))
        copied = 0
        if take_over:
            self.allocator.release(partial.block)
            own.insert(0, self.tree.detach(partial))
        elif partial is not None:
            self.copies.append((partial.block, own[0]))  # its reference is dropped after the forward
            copied = partial_len
        table.blocks += own
        return Admission(table, reused, copied, restored.from_host, restored.from_disk)

    # ---- the tiers below the pool ----------------------------------------------------------------------------
    def below(self, tokens: list[int], limit: int, root: Node) -> list[tuple[Node | bytes, tuple[int, ...], bytes]]:
        """The blocks of tokens[:limit] past the tree's full nodes under root that the tiers hold, in order: (parent,
        tokens, key), the parent being a tree node (or root) for the first and the previous key after. Full blocks
        as far as the chain goes, then the longest tail (a partial block) longer than what the tree itself shares
        there."""
        tiers, bs = self.tiers, self.block_size
        match = self.tree.match(tokens, limit, root)
        node = match.nodes[-1] if match.nodes else root
        start = len(match.nodes) * bs
        parent, key, found = node, node.key, []

        def held(k: bytes) -> bool:
            return (tiers.host is not None and k in tiers.host) or (tiers.disk is not None and k in tiers.disk)

        while start + bs <= limit:
            block = tuple(tokens[start : start + bs])
            child = block_key(key, block)
            if not held(child):
                break
            found.append((parent, block, child))
            parent, key, start = child, child, start + bs
        rest = tokens[start : min(limit, start + bs)]
        shared = 0 if found else match.partial_len  # the tree may share part of this block already
        for length in range(min(len(rest), bs - 1), shared, -1):
            tail = tuple(rest[:length])
            child = block_key(key, tail)
            if held(child):
                found.append((parent, tail, child))
                break
        return found

    def restore(self, tokens: list[int], limit: int, root: Node) -> Restored:
        """Promote into the tree the blocks of tokens[:limit] that host memory holds past the tree's own under root,
        each held (pinned) so that promoting the next cannot evict it. Stops at the first block not in host memory
        or when the pool has no block to give."""
        host, out = self.tiers.host, Restored()
        if host is None or not len(host):
            return out
        node = None
        for parent, block_tokens, key in self.below(tokens, limit, root):
            if key not in host:
                break
            if node is None and parent.parent is not None:  # held too, or the allocation below could evict it
                self.allocator.share(parent.block)
                out.pinned.append(parent.block)
            entry = host.take(key)  # out of the LRU order, so that the evictions below cannot pick it
            block = self.allocate()
            if block is None:
                host.put_back(entry)
                break
            self.transfers.append((Transfer.PROMOTE, entry.slot, block, key))
            host.release(entry.slot)  # transfers run in order: a later demotion may reuse the slot
            node = self.tree.insert(parent if node is None else node, block_tokens, block)
            if node is None or node.block != block:  # the tree had it after all (cannot happen: it was not found)
                self.allocator.release(block)
                break
            out.pinned.append(block)
            if entry.from_disk:
                out.from_disk += len(block_tokens)
            else:
                out.from_host += len(block_tokens)
            self.restored_blocks += 1
            if len(block_tokens) < self.block_size:
                break
        return out

    def prefetch(self, tokens: list[int], budget: int, cache_salt: str | bytes | None = None) -> list[HostEntry]:
        """Read the blocks of a prompt (under its cache_salt) that only the disk holds into host memory, at most
        `budget` of them: LOAD transfers into newly taken host slots. The caller runs them and reports with
        loaded()."""
        tiers = self.tiers
        if tiers is None or not tiers.reads_disk:
            return []
        loads = []
        root = self.tree.namespace(cache_salt)
        keys = [key for _, _, key in self.below(tokens, len(tokens) - 1, root)]  # from the chain's start: it newest
        tiers.disk.touch(keys)  # first, so that the disk's evictions for the loads' spills keep the files they read
        for key in keys:
            if key in tiers.host:
                continue
            if len(loads) >= budget:
                break
            entry = self.host_slot(key, from_disk=True)
            self.transfers.append((Transfer.LOAD, 0, entry.slot, key))
            loads.append(entry)
        tiers.host.touch(keys)
        return loads

    def loaded(self, loads: list[HostEntry], ok: list[bool]) -> None:
        """Which loads every rank managed. A file that failed anywhere is dropped from the index and deleted."""
        tiers = self.tiers
        for entry, good in zip(loads, ok, strict=True):
            if good:
                continue
            if tiers.host.entries.get(entry.key) is entry:
                tiers.host.take(entry.key)
                tiers.host.release(entry.slot)
            tiers.disk.remove(entry.key)
            self.transfers.append((Transfer.DELETE, 0, 0, entry.key))

    def host_slot(self, key: bytes, from_disk: bool = False) -> HostEntry:
        """A host slot for `key`; what the host tier evicts for it goes to disk first (unless the disk has it)."""
        entry, evicted = self.tiers.host.put(key, from_disk)
        for old in evicted:
            self.save(Transfer.SAVE_HOST, old.slot, old.key)
        return entry

    def save(self, op: Transfer, source: int, key: bytes) -> None:
        """Write a block to disk if the disk tier lacks it; the files it evicts are deleted."""
        disk = self.tiers.disk
        if disk is None or key in disk:
            return
        self.transfers.append((op, source, 0, key))
        for old in disk.add(key):
            self.transfers.append((Transfer.DELETE, 0, 0, old))

    def demote(self, node: Node) -> None:
        """The tree evicts node: its block's data moves to host memory (before the block is reused), unless host
        memory has the block already (read from disk for a turn while another computed it)."""
        host = self.tiers.host
        if node.key in host:
            host.touch([node.key])
            return
        if not host.free and not len(host):  # its only slot is reserved by a promotion under way: to disk instead
            self.save(Transfer.SAVE_POOL, node.block, node.key)
            return
        entry = self.host_slot(node.key)
        self.transfers.append((Transfer.DEMOTE, node.block, entry.slot, node.key))

    def flush(self) -> int:
        """Save to disk what the pool and host memory hold and the disk lacks (at the end of a job, so that the next
        one finds it), the most recently used first when the disk cannot take everything. Returns the blocks saved."""
        tiers = self.tiers
        if tiers is None or tiers.disk is None:
            return 0
        # oldest first: host memory holds what the pool evicted; in the tree, a node is never newer than its parent
        blocks = [(Transfer.SAVE_HOST, e.slot, e.key) for e in tiers.host.entries.values()] if tiers.host else []
        nodes = sorted(self.tree.nodes(), key=lambda n: (n.last_used, -n.depth))
        blocks += [(Transfer.SAVE_POOL, n.block, n.key) for n in nodes]
        newest, seen = [], set(tiers.disk.index)
        for block in reversed(blocks):  # each key once: a block demoted and computed again is in both
            if block[2] not in seen:
                seen.add(block[2])
                newest.append(block)
        blocks = newest[: tiers.disk.capacity][::-1]
        for op, source, key in blocks:
            self.save(op, source, key)
        return len(blocks)

    def drop_cache(self) -> Dropped:
        """A cache flush: drop every cached block that no running turn holds, from the tree (deepest first, so that
        a node goes once its children have), host memory and disk (DELETE transfers for its files). Nothing is
        demoted: the tiers below are emptied too. What running turns hold stays in the tree, with its ancestors,
        and they go on committing to it; later turns recompute what was dropped. Call between steps (no copies
        or transfers pending)."""
        tree, tiers = self.tree, self.tiers
        pool = 0
        for node in sorted(tree.nodes(), key=lambda n: n.depth, reverse=True):
            if tree.evictable(node):
                tree.remove(node)
                pool += 1
        host = tiers.host.clear() if tiers is not None and tiers.host is not None else 0
        files = tiers.disk.clear() if tiers is not None and tiers.disk is not None else []
        self.transfers += [(Transfer.DELETE, 0, 0, key) for key in files]
        return Dropped(pool_blocks=pool, host_blocks=host, disk_blocks=len(files), kept_tokens=tree.cached_tokens)

    def take_transfers(self) -> list[tuple[Transfer, int, int, bytes]]:
        """The tier transfers the next plan must run, in the order they were decided."""
        transfers, self.transfers = self.transfers, []
        return transfers

    def grow(self, table: BlockTable, tokens: int) -> bool:
        """Own blocks until the table covers `tokens` positions; False when the pool has none left."""
        while len(table.blocks) < self.blocks_for(tokens):
            block = self.allocate()
            if block is None:
                return False
            table.blocks.append(block)
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies the next forward must run first."""
        copies, self.copies = self.copies, []
        return copies

    def copies_done(self, copies: list[tuple[int, int]]) -> None:
        for source, _ in copies:
            self.allocator.release(source)

    def commit(self, table: BlockTable, tokens: list[int], cached: int) -> None:
        """Give the tree the table's blocks that `cached` computed tokens have filled. A block the tree already
        holds (another turn computed the same tokens first) is shared instead, and the table's copy freed."""
        bs = self.block_size
        while table.committed < cached // bs:
            k = table.committed
            node = self.tree.insert(table.node, tuple(tokens[k * bs : (k + 1) * bs]), table.blocks[k])
            if node.block != table.blocks[k]:
                self.allocator.share(node.block)
                self.allocator.release(table.blocks[k])
                table.blocks[k] = node.block
            table.node, table.committed = node, k + 1

    def release(self, table: BlockTable, tokens: list[int], cached: int, keep: bool = True) -> None:
        """The turn ends (or is preempted): with keep, its computed tokens stay cached in the tree (its last, partial
        block as a tail); then it drops every reference it holds (blocks committed earlier stay in the tree)."""
        if keep:
            self.commit(table, tokens, cached)
            k = table.committed
            if cached > k * self.block_size:
                tail = self.tree.insert(table.node, tuple(tokens[k * self.block_size : cached]), table.blocks[k])
                if tail is not None:
                    self.tree.offer(tail)
        for block in table.blocks:
            self.allocator.release(block)
        self.tree.offer(table.node)
        root = table.node
        while root.parent is not None:
            root = root.parent
        table.blocks, table.committed, table.node = [], 0, root

    def usage(self) -> tuple[int, int]:
        """(tokens the tree holds, blocks in use)."""
        return self.tree.cached_tokens, self.allocator.num_used
