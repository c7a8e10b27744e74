"""The prefix tree on rank 0: a radix tree over token ids indexing everything the pool holds, one block per node.

A node at depth d holds the tokens [d*block_size, d*block_size + len(tokens)) of every conversation through it, in
its block. Full nodes (block_size tokens) may have children; a tail (fewer tokens: the end of a conversation) is
always a leaf. Nodes are immutable: a turn never writes into a block the tree holds. The tree is one holder of each
of its blocks; eviction frees the least recently used leaves that no running turn holds, so a conversation loses
its newest tokens first and keeps the prefix it shares with others. Each node carries its key (tiers.block_key), and
on_evict lets the block manager move an evicted block's data to the tier below before the block is reused.

Requests with a cache_salt live in namespaces of their own: one root per salt (keyed by tiers.salted_root), so a
prompt is matched only against what was cached under the same salt, and the keys chained from that root name its
blocks in every tier. A salt's root is kept while it has children; `root` is the shared namespace (no salt).
"""

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tp_infer.kv.blocks import BlockAllocator
from tp_infer.kv.tiers import KEY_BYTES, block_key, salted_root


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the longest common prefix, comparing 64-token slices at C speed before single tokens."""
    n, i = min(len(a), len(b)), 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    block: int  # -1 at a root
    parent: "Node | None"  # None at a root
    depth: int  # tokens before this node
    key: bytes  # names the whole prefix up to the end of this node (tiers.block_key)
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    last_used: int = 0
    attached: bool = True


@dataclass
class Match:
    """The longest cached prefix of a prompt: whole nodes along it, then a node sharing `partial_len` more tokens
    within the next block (0: none)."""

    nodes: list[Node]
    partial: Node | None
    partial_len: int

    @property
    def length(self) -> int:
        return sum(len(n.tokens) for n in self.nodes) + self.partial_len


class PrefixTree:
    def __init__(self, allocator: BlockAllocator, block_size: int, root_key: bytes = bytes(KEY_BYTES)):
        self.allocator, self.block_size = allocator, block_size
        self.root = Node((), -1, None, 0, root_key)
        self.roots: dict[bytes, Node] = {root_key: self.root}  # by key: the shared root, and each salt's
        self.on_evict: Callable[[Node], None] | None = None  # told of each evicted node while its block is valid
        self.num_nodes = 0
        self.cached_tokens = 0
        self.evicted_blocks = 0
        self.clock = 0
        self.heap: list[tuple[int, int, Node]] = []  # (last_used, order, node): eviction candidates, lazily checked
        self.order = itertools.count()

    def namespace(self, cache_salt: str | bytes | None) -> Node:
        """The root of a cache_salt's prompts (None: the shared root). A salt with nothing cached gets a new, empty
        root, registered by the first insert under it. Changes nothing."""
        key = salted_root(self.root.key, cache_salt)
        root = self.roots.get(key)
        return root if root is not None else Node((), -1, None, 0, key)

    def match(self, tokens: list[int], limit: int, root: Node | None = None) -> Match:
        """The longest prefix of tokens[:limit] the tree holds under root (default: the shared one). Changes
        nothing."""
        bs, node, nodes, k = self.block_size, root or self.root, [], 0
        while (k + 1) * bs <= limit:
            child = node.children.get(tuple(tokens[k * bs : (k + 1) * bs]))
            if child is None:
                break
            nodes.append(child)
            node, k = child, k + 1
        rest = tokens[k * bs : min(limit, (k + 1) * bs)]
        best, best_len = None, 0
        if rest:
            for child in node.children.values():
                n = common_prefix(child.tokens, rest)
                if n > best_len:
                    best, best_len = child, n
        return Match(nodes, best, best_len)

    def touch(self, nodes: list[Node]) -> None:
        """Mark a path as just used (LRU); ancestors are never older than their descendants."""
        self.clock += 1
        for node in nodes:
            node.last_used = self.clock
        if nodes:
            self.offer(nodes[-1])

    def insert(self, parent: Node, tokens: tuple[int, ...], block: int) -> Node | None:
        """Index `block`, holding `tokens`, under parent (a full node or a root); the tree takes a reference.
        Returns the node now holding these tokens: an existing one if they were there already (the caller's block
        stays the caller's), or None for a tail that a sibling already covers."""
        if parent.parent is None:  # a root: the one registered for its namespace (registered now if it is new)
            parent = self.roots.setdefault(parent.key, parent)
        assert parent.attached and (parent.parent is None or len(parent.tokens) == self.block_size)
        existing = parent.children.get(tokens)
        if existing is not None:
            return existing
        for sibling in list(parent.children.values()):
            shared = common_prefix(sibling.tokens, tokens)
            if shared == len(tokens):
                return None  # a tail inside a longer sibling: nothing new
            if shared == len(sibling.tokens) and self.allocator.refs[sibling.block] == 1:
                self.remove(sibling)  # an unused tail that the new block covers
        depth = parent.depth + len(parent.tokens)
        node = Node(tokens, block, parent, depth, block_key(parent.key, tokens), last_used=self.clock)
        parent.children[tokens] = node
        self.allocator.share(block)
        self.num_nodes += 1
        self.cached_tokens += len(tokens)
        self.offer(node)
        return node

    def detach(self, node: Node) -> int:
        """Take an unreferenced tail out of the tree; its reference passes to the caller. Returns its block."""
        assert not node.children and self.allocator.refs[node.block] == 1
        self._unlink(node)
        return node.block

    def remove(self, node: Node) -> None:
        """Drop a leaf and the tree's reference to its block."""
        self._unlink(node)
        self.allocator.release(node.block)

    def _unlink(self, node: Node) -> None:
        parent = node.parent
        del parent.children[node.tokens]
        node.attached = False
        self.num_nodes -= 1
        self.cached_tokens -= len(node.tokens)
        if parent.parent is not None:
            if not parent.children:
                self.offer(parent)
        elif parent is not self.root and not parent.children and self.roots.get(parent.key) is parent:
            del self.roots[parent.key]  # an empty salt namespace: forgotten (a new root is made if it comes back)

    def offer(self, node: Node) -> None:
        """node may have become evictable (a leaf whose block only the tree holds): queue it."""
        if node.parent is not None and not node.children:
            heapq.heappush(self.heap, (node.last_used, next(self.order), node))
            if len(self.heap) > 4 * self.num_nodes + 1024:
                self._rebuild_heap()

    def evictable(self, node: Node) -> bool:
        """A leaf whose block only the tree holds."""
        return node.attached and not node.children and self.allocator.refs[node.block] == 1

    def evict(self, count: int) -> int:
        """Free up to `count` blocks, least recently used unheld leaves first. Returns how many were freed."""
        freed, held = 0, []
        while freed < count and self.heap:
            entry = heapq.heappop(self.heap)
            last_used, _, node = entry
            if last_used != node.last_used or not node.attached or node.children:
                continue  # stale: touched since, or no longer a leaf
            if not self.evictable(node):
                held.append(entry)  # a running turn holds it: a candidate again once it lets go
                continue
            if self.on_evict is not None:
                self.on_evict(node)
            self.remove(node)
            self.evicted_blocks += 1
            freed += 1
        for entry in held:
            heapq.heappush(self.heap, entry)
        return freed

    def _rebuild_heap(self) -> None:
        self.heap = [(n.last_used, next(self.order), n) for n in self.nodes() if not n.children]
        heapq.heapify(self.heap)

    def nodes(self) -> list[Node]:
        """Every node but the roots, in every namespace."""
        out, stack = [], [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
