"""The compiled decode step (tp_infer.engine.graphs) against the eager one, at world sizes 1 and 2 in real
processes: the same logits at every step, padded rows never disturbing the real ones."""

import pytest
import rank_fns
import torch
from harness import run_ranks

from tp_infer.engine.graphs import buckets


def test_buckets_are_powers_of_two_covering_the_largest_batch():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(5) == [1, 2, 4, 8] and buckets(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_decode_steps_give_the_eager_logits(converted, world_size):
    results = run_ranks(world_size, rank_fns.compiled_decode, str(converted["v3"]), timeout=600)
    eager, compiled = results[0][False], results[0][True]
    assert len(eager) == len(compiled) == 8
    for step, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert a.shape == b.shape, step
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item(), rtol=0), step
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
    assert all(r[True] == [None] * 8 for r in results[1:]), "followers get no logits"
