"""The pool's bookkeeping on rank 0: which blocks are free, and how many holders each used block has (the prefix
tree is one holder, every running turn whose block table lists the block is another)."""

from collections import deque


class BlockAllocator:
    """Free list and reference counts of num_blocks blocks. A block is free exactly when its count is zero."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int | None:
        """A free block with one reference, or None when every block is in use."""
        if not self.free:
            return None
        block = self.free.popleft()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a block in use."""
        assert self.refs[block] > 0, f"block {block} is free"
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; the last one frees the block."""
        assert self.refs[block] > 0, f"block {block} is already free"
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)
