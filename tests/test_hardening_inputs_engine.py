"""Issue 28, the Python API: a failure inside one turn (its sampling, its client's callback) ends that turn with
an error, never the engine or the other turns; seeds the generator cannot take are refused when submitted."""

import pytest
from harness import run_ranks
from rank_fns import serve

from tp_infer.engine.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24], [30, 31]]
GREEDY = SamplingParams(max_new_tokens=6)
POISON = SamplingParams(max_new_tokens=6, top_k=13)  # the turn whose sampling raises


def failing_turns(engine, prompts):
    """Runs on rank 0: each prompt alone, then all of them together with a turn whose sampling raises and one
    whose on_token callback raises at its third token, then a turn in each failed turn's session."""
    import tp_infer.engine.engine as engine_module
    from tp_infer.engine.session import Session

    real_sample = engine_module.sample

    def sample(logits, params, generator=None, *history):
        if params.top_k == POISON.top_k:
            raise RuntimeError("invalid multinomial distribution\nsecond line")
        return real_sample(logits, params, generator, *history)

    engine_module.sample = sample
    alone = [engine.generate(Session(f"alone-{i}"), p, GREEDY).generated for i, p in enumerate(prompts)]

    def callback_failing_at_third(token, seen=[]):  # noqa: B006 - counts this turn's tokens
        seen.append(token)
        if len(seen) == 3:
            raise ConnectionResetError("client gone")

    good = [engine.submit(Session(f"good-{i}"), p, None, GREEDY) for i, p in enumerate(prompts)]
    poisoned = engine.submit(Session("poisoned"), prompts[0] + [3], None, POISON)
    dropped = engine.submit(Session("dropped"), prompts[1] + [3], None, GREEDY, callback_failing_at_third)
    engine.run()
    after = [engine.generate(t.session, [40, 41], GREEDY) for t in (poisoned, dropped)]
    usage = engine.cache_usage()
    return {
        "alone": alone,
        "good": [(t.generated, t.finish_reason, t.error) for t in good],
        "poisoned": (poisoned.generated, poisoned.finish_reason, poisoned.error, poisoned.done),
        "dropped": (dropped.generated, dropped.finish_reason, dropped.error, dropped.done),
        "after": [(t.finish_reason, len(t.generated), t.stats.reused_tokens) for t in after],
        "idle": not engine.scheduler.has_work,
        "used_blocks": usage.used_blocks,
        "cached_blocks": -(-usage.cached_tokens // usage.block_size),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_failing_turn_ends_alone_with_its_error(converted, world_size):
    options = {"max_seq_len": 64, "max_batch_size": 8}
    out = run_ranks(world_size, serve, str(converted["v3"]), options, failing_turns, PROMPTS)[0]
    assert [g for g, _, _ in out["good"]] == out["alone"], "the other turns' replies must not change"
    assert all(reason == "length" and error is None for _, reason, error in out["good"])
    generated, reason, error, done = out["poisoned"]
    assert (generated, reason, done) == ([], "error", True)
    assert error == "RuntimeError: invalid multinomial distribution", "one line, naming what failed"
    generated, reason, error, done = out["dropped"]
    assert (len(generated), reason, error, done) == (3, "error", "ConnectionResetError: client gone", True)
    # each failed turn's session goes on, and finds what the failed turn computed in the cache
    assert [(reason, n) for reason, n, _ in out["after"]] == [("length", 6), ("length", 6)]
    assert all(reused > 0 for _, _, reused in out["after"])
    assert out["idle"]
    assert out["used_blocks"] <= out["cached_blocks"] + 1, "a failed turn must not keep blocks of its own"


def refused_seeds(engine, seeds):
    from tp_infer.engine.engine import TurnRefused
    from tp_infer.engine.session import Session

    answers = []
    for seed in seeds:
        try:
            turn = engine.generate(Session(f"seed-{seed}", seed=seed), [5, 6, 7], SamplingParams(max_new_tokens=2))
            answers.append(turn.finish_reason)
        except TurnRefused as e:
            answers.append(str(e))
    return answers


def test_seeds_the_generator_cannot_take_are_refused_when_submitted(converted):
    seeds = [2**64, -(2**63) - 1, 2**64 - 1, -(2**63)]
    answers = run_ranks(1, serve, str(converted["v3"]), {"max_seq_len": 64}, refused_seeds, seeds)[0]
    assert answers[0].startswith("seed must be an integer in [") and answers[0].endswith("got 18446744073709551616")
    assert answers[1].endswith("got -9223372036854775809")
    assert answers[2:] == ["length", "length"], "even at temperature 0 the generator is seeded: both ends work"
