"""One KV pool for every conversation: reuse across requests through the prefix tree, shared prefixes stored once,
token-exact matches at any block boundary, eviction and preemption, all equal to runs that reuse nothing."""

import engine_drivers as drv
import pytest
import rank_fns
from harness import run_ranks
from test_engine import token_lists

from tp_infer.kv.radix import common_prefix

BS = rank_fns.BLOCK


def serve(world_size, ckpt, options, driver, *args):
    return run_ranks(world_size, rank_fns.serve, str(ckpt), options, driver, *args)[0]


CONFIGS = [
    (1, "absorb", "auto"),
    (2, "absorb", "auto"),
    (2, "naive", "auto"),
    (1, "naive", "fp8"),
    (2, "absorb", "fp8"),
]


@pytest.mark.parametrize(("world_size", "impl", "kv"), CONFIGS)
def test_shared_system_prompt_is_computed_and_stored_once(converted, world_size, impl, kv):
    system = token_lists(20, [300])[0]
    own = token_lists(21, [5, 9, 14, 3, 20, 7, 11, 16])
    for i, tokens in enumerate(own):
        tokens[0] = 2 + i  # the eight diverge at their first own token
    options = {"max_seq_len": 512, "max_batch_size": 8, "attn_impl": impl, "kv_cache_dtype": kv}
    out = serve(world_size, converted["v3"], options, drv.shared_system_prompt, system, own)
    shared, alone = out["shared"], out["alone"]
    assert sum(t["computed"] for t in shared) == 300 + sum(len(t) for t in own)
    assert sorted(t["reused"] for t in shared) == [0] + [300] * 7
    if kv == "auto":
        assert [t["generated"] for t in shared] == [t["generated"] for t in alone]
    else:  # fp8 rounds differently when a row is computed alone (other scales), so allow a rare flip
        same = sum(
            a == b
            for s, f in zip(shared, alone, strict=True)
            for a, b in zip(s["generated"], f["generated"], strict=False)
        )
        assert same >= 0.9 * sum(len(t["generated"]) for t in shared)
    # the system prompt's 18 full blocks are the same blocks for all eight; block 18 (12 system tokens, then each
    # one's own) is each one's copy; nothing else is held twice
    assert all(p == out["paths"][0] for p in out["paths"]) and len(out["paths"][0]) == 300 // BS
    own_blocks = sum(
        -(-(300 + len(t) + len(s["generated"])) // BS) - 300 // BS for t, s in zip(own, shared, strict=False)
    )
    assert out["used_blocks"] == 300 // BS + own_blocks


@pytest.mark.parametrize(("world_size", "impl", "kv"), CONFIGS[:3])
def test_block_boundaries_and_matches_inside_a_block(converted, world_size, impl, kv):
    base = token_lists(30, [40])[0]
    prompts = [
        base[: BS - 1],  # one short of a block
        base[:BS],  # exactly one block: only 15 can be reused later, the last token is always fed
        base[: BS + 1],  # one past it
        [*base[:21], 7, 7, 7],  # diverges from base inside block 1
        [*base[:21], 7, 7, 9, 9],  # diverges from the previous one inside the same block
        base[:40],  # the longest: block 2 partly matches the first prompts' tails
        base[:3] + [5] * 30,  # a match of three tokens inside block 0
    ]
    options = {"max_seq_len": 256, "max_batch_size": 4, "attn_impl": impl, "kv_cache_dtype": kv}
    out = serve(world_size, converted["v3"], options, drv.sequence, prompts)
    assert [t["generated"] for t in out["reused"]] == [t["generated"] for t in out["fresh"]]
    histories, reused = [], []
    for prompt, turn in zip(prompts, out["reused"], strict=True):
        best = max([0] + [common_prefix(prompt, h) for h in histories])
        reused.append(turn["reused"])
        assert turn["reused"] == min(best, len(prompt) - 1), (prompt, turn)
        assert turn["computed"] == len(prompt) - turn["reused"]
        histories.append(prompt + turn["generated"])
    assert reused[:3] == [0, BS - 1, BS] and reused[3] >= BS + 1 and reused[4] == 23 and reused[5] >= 21
    assert reused[6] == 3 and base[3] != 5


@pytest.mark.parametrize("world_size", [1, 2])
def test_small_pool_evicts_and_preempts_with_equal_output(converted, world_size):
    """Six conversations advanced together through a pool a few blocks larger than one conversation: idle ones lose
    their cache to eviction and running ones are preempted mid-generation, with the output of a pool that holds
    them all."""
    rounds = token_lists(40, [9, 5, 12])
    small = {"max_seq_len": 96, "max_batch_size": 6, "pool_tokens": 96 + 3 * BS}
    roomy = {"max_seq_len": 96, "max_batch_size": 6}
    tight = serve(world_size, converted["v3"], small, drv.interleaved_rounds, 6, rounds)
    ample = serve(world_size, converted["v3"], roomy, drv.interleaved_rounds, 6, rounds)
    for a, b in zip(tight["turns"], ample["turns"], strict=True):
        assert [t["generated"] for t in a] == [t["generated"] for t in b]
    assert tight["evicted"] > 0 and tight["preemptions"] > 0, tight
    assert ample["evicted"] == 0 and ample["preemptions"] == 0
    assert all(t["computed"] == len(r) for conv in ample["turns"] for t, r in zip(conv, rounds, strict=True))


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
def test_decode_goes_on_while_another_turn_prefills(converted, policy):
    """A long prompt arriving while others decode: the mixed scheduler keeps every decoding turn in every step
    (prefill_first stalls them); outputs are the same either way."""
    options = {"max_seq_len": 512, "max_batch_size": 4, "max_num_batched_tokens": 64, "policy": policy}
    out = serve(1, converted["v3"], options, drv.decode_during_prefill, token_lists(50, [6, 7, 8]), [3] * 300)
    assert out["same_as_alone"]
    if policy == "mixed":
        assert out["decode_rows_while_prefilling"] == out["prefill_steps"] * 3 > 0
    else:
        assert out["decode_rows_while_prefilling"] == 0
