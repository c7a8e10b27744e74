"""What one forward computes, as the model sees it: a flat stream of new tokens, where their cache entries go, and
which cached blocks each row attends over. Built by the runner from rank 0's plan; the model only reads it."""

from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """`rows` rows of `width` new tokens each, tokens [start, start + rows * width) of the step, attended together:
    decode rows (width 1) share one group, a prefill row is a group of its own, so nothing is padded."""

    start: int
    rows: int
    width: int
    block_table: torch.Tensor  # [rows, nb] the blocks holding each row's positions 0 .. nb * block_size - 1
    visible: torch.Tensor  # [rows, width, nb * block_size] True where a new token may attend (causal, in range)
    lengths: torch.Tensor  # [rows] int64: the positions each row's last new token attends over (its position + 1)
    causal: bool = False  # every row starts at position 0: visible is the causal mask over the first `width` keys
    first_block: int | None = None  # one row whose blocks are first_block, first_block + 1, ...: read in place

    @property
    def end(self) -> int:
        return self.start + self.rows * self.width


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [N] absolute position of each new token
    slots: torch.Tensor  # [N] where its cache entries go: block * block_size + offset
    groups: list[AttentionGroup]  # in stream order, covering all N tokens
    last: torch.Tensor  # [B] index in the stream of each row's last new token
