"""The multi-turn engine: reuse gives exactly what recomputation gives, computing only the new tokens."""

import random

import engine_drivers as drv
import pytest
import rank_fns
from harness import run_ranks

from tp_infer.kv.radix import common_prefix


def token_lists(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(n)] for n in lengths]


EIGHT_TURNS = token_lists(1, [12, 5, 9, 3, 7, 1, 6, 4])


def serve(world_size, ckpt, options, driver, *args):
    return run_ranks(world_size, rank_fns.serve, str(ckpt), options, driver, *args)[0]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_reuse_equals_recompute_and_computes_only_new_tokens(converted, world_size, impl):
    options = {"max_seq_len": 256, "max_batch_size": 2, "attn_impl": impl}
    out = serve(world_size, converted["v3"], options, drv.reuse_and_recompute, EIGHT_TURNS)
    reuse, recompute = out["reuse"], out["recompute"]
    assert [t["generated"] for t in reuse] == [t["generated"] for t in recompute]
    assert [t["computed"] for t in reuse] == [len(t) for t in EIGHT_TURNS]
    history = 0
    for turn, new in zip(reuse, EIGHT_TURNS, strict=True):
        assert turn["reused"] == history and turn["prompt"] == history + len(new)
        history = turn["prompt"] + len(turn["generated"])
    assert [t["computed"] for t in recompute] == [t["prompt"] for t in recompute]
    generated = [tok for t in reuse for tok in t["generated"]]
    assert len(set(generated)) > 8, "a degenerate model would make this comparison vacuous"


def test_edited_history_truncates_at_first_difference(converted):
    turns = token_lists(2, [10, 6, 8])
    edit_at = 13  # inside the second turn's message
    out = serve(1, converted["v3"], {"max_seq_len": 256}, drv.edited_history, turns, edit_at)
    edited, fresh = out["edited"], out["fresh"]
    assert edited["reused"] == edit_at
    assert edited["computed"] == edited["prompt"] - edit_at
    assert edited["generated"] == fresh["generated"]
    assert fresh["reused"] == 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_overflow_drops_oldest_turns_and_equals_fresh_run(converted, world_size):
    system = [3, 4, 5, 6]
    turns = token_lists(3, [10, 8, 12, 9, 11, 7])
    too_long = list(range(2, 60))
    after = [40, 41, 42]
    options = {"max_seq_len": 64, "max_batch_size": 4}
    out = serve(world_size, converted["v3"], options, drv.overflow, system, turns, too_long, after)
    dropped_any = False
    cached = []  # what the session's cache held before each turn: the previous prompt and reply
    for rec in out["records"]:
        turn, fresh = rec["turn"], rec["fresh"]
        assert turn["generated"] == fresh["generated"]
        assert turn["prompt_ids"][: len(system)] == system, "the system prompt is never dropped"
        assert turn["prompt"] + 8 <= 64
        # only the longest common prefix with the cache is reused: after a drop, the system prompt (plus
        # whatever tokens happen to coincide after it)
        assert turn["reused"] == common_prefix(cached, turn["prompt_ids"])
        assert turn["computed"] == turn["prompt"] - turn["reused"]
        if turn["dropped"]:
            dropped_any = True
            assert turn["reused"] < len(cached)
        cached = turn["prompt_ids"] + turn["generated"]
    assert dropped_any
    assert "max_seq_len 64" in out["refused"]
    assert out["unchanged"]
    assert out["after"]["generated"] == out["after_fresh"]["generated"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_sessions_batched_at_different_lengths_equal_each_alone(converted, world_size):
    histories = [token_lists(4, [15, 4]), token_lists(5, [3]), token_lists(6, [20, 9, 6])]
    final = token_lists(7, [5, 11, 2])
    options = {"max_seq_len": 256, "max_batch_size": 4}
    batched = serve(world_size, converted["v3"], options, drv.interleaved, histories, final)
    single = serve(world_size, converted["v3"], options, drv.alone, histories, final)
    assert batched["max_rows"] == 3, "the three turns must share forwards"
    assert [t["generated"] for t in batched["final"]] == [t["generated"] for t in single]
    assert [t["computed"] for t in batched["final"]] == [len(t) for t in final]


def test_sampled_sessions_do_not_depend_on_batching(converted):
    """With temperature, each session draws from its own seeded stream: batched equals alone."""
    from tp_infer.engine.sampling import SamplingParams

    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=8)
    histories = [token_lists(8, [6]), token_lists(9, [9, 3]), token_lists(10, [4])]
    final = token_lists(11, [3, 5, 7])
    options = {"max_seq_len": 256, "max_batch_size": 4}
    batched = serve(1, converted["v3"], options, drv.interleaved, histories, final, sampling)
    single = serve(1, converted["v3"], options, drv.alone, histories, final, sampling)
    assert [t["generated"] for t in batched["final"]] == [t["generated"] for t in single]


@pytest.mark.parametrize("world_size", [1, 2])
def test_eviction_recomputes_and_equals_unevicted_run(converted, world_size):
    """Three conversations in round robin through a pool too small for all three: their returning turns lose their
    newest cached tokens to eviction and recompute them, with the same output as a pool that holds them all."""
    rounds = token_lists(12, [7, 4, 6])
    small = {"max_seq_len": 256, "max_batch_size": 2, "pool_tokens": 64}
    evicting = serve(world_size, converted["v3"], small, drv.round_robin, 3, rounds)
    roomy = serve(world_size, converted["v3"], {"max_seq_len": 256, "max_batch_size": 4}, drv.round_robin, 3, rounds)
    for ev, ok in zip(evicting, roomy, strict=True):
        assert [t["generated"] for t in ev] == [t["generated"] for t in ok]
        assert [t["computed"] for t in ok] == [len(r) for r in rounds]
    later = [t for ev in evicting for t in ev[1:]]
    assert any(t["computed"] > len(rounds[1]) for t in later), "the small pool must have evicted something"
