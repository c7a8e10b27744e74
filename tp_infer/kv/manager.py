"""Rank 0's view of the pool: gives turns their blocks, finds their longest cached prefix, and gives what they computed
to the prefix tree.

A turn's block table, for a conversation of 40 tokens with block_size 16 that matched 20 cached tokens:

    position   0 ........ 15 | 16 .. 19 · 20 ....... 31 | 32 ..... 39
    block      tree node A   | own: 4 copied + computed  | own: computed
               (shared, held) \\ from the node that shared them

Blocks [0, committed) are the tree's nodes along the turn's path (immutable, shared); the rest are its own, written
only by it. As its own blocks fill they are committed to the tree, so other turns can share them at once; when the
turn ends its last, partial block joins the tree as a tail and the turn drops its references.
"""

from dataclasses import dataclass, field

from tp_infer.kv.blocks import BlockAllocator
from tp_infer.kv.radix import Node, PrefixTree


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


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size}: must be a power of two")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tree = PrefixTree(self.allocator, block_size)
        self.copies: list[tuple[int, int]] = []  # (source, destination) for the next forward, sources held till then

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

    def admit(self, tokens: list[int], first_chunk: int, reuse: bool) -> Admission | None:
        """Blocks for a new turn over `tokens`: its longest cached prefix (never the last token, whose logits choose
        the reply), and own blocks for its next min(first_chunk, rest) tokens. None when the pool cannot give them;
        the turn then holds nothing (eviction may have freed blocks meanwhile)."""
        bs = self.block_size
        match = self.tree.match(tokens, len(tokens) - 1) if reuse else None
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
        table = BlockTable(nodes[-1] if nodes else self.tree.root, [n.block for n in nodes], len(nodes))
        copied = 0
        if take_over:
            self.allocator.release(partial.block)
            own.insert(0, self.tree.detach(partial))
        elif partial is not None:
            self.copies.append((partial.block, own[0]))  # its reference is dropped after the forward
            copied = partial_len
        table.blocks += own
        return Admission(table, reused, copied)

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
        table.blocks, table.committed, table.node = [], 0, self.tree.root

    def usage(self) -> tuple[int, int]:
        """(tokens the tree holds, blocks in use)."""
        return self.tree.cached_tokens, self.allocator.num_used
