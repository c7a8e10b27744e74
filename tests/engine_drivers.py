"""Drivers run on rank 0 by rank_fns.serve: each gets an Engine and returns plain data for the test to check."""

import contextlib
from collections.abc import Iterator

from tp_infer.engine.engine import Engine, TurnRefused
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session

GREEDY = SamplingParams(max_new_tokens=8, eos_token_ids=(1,))


def turn_record(turn) -> dict:
    s = turn.stats
    return {
        "generated": turn.generated,
        "finish": turn.finish_reason,
        "prompt": s.prompt_tokens,
        "reused": s.reused_tokens,
        "computed": s.computed_tokens,
        "host": s.host_tokens,
        "disk": s.disk_tokens,
        "dropped": s.dropped_tokens,
        "prompt_ids": list(turn.prompt),
    }


@contextlib.contextmanager
def recording(engine: Engine) -> Iterator[list[list[int]]]:
    """While inside, the token counts of every forward's rows are appended to the list yielded."""
    plans, forward = [], engine.runner.forward

    def recording_forward(plan):
        plans.append(plan.num_new.tolist())
        return forward(plan)

    engine.runner.forward = recording_forward
    try:
        yield plans
    finally:
        engine.runner.forward = forward


def recomputing(engine: Engine) -> Engine:
    """An engine on the same runner and pool that reuses nothing: the oracle for reuse."""
    return Engine(engine.runner, reuse=False, manager=engine.manager)


def conversation(engine: Engine, turns: list[list[int]], sampling=GREEDY, session_id="s") -> list[dict]:
    session = Session(session_id)
    return [turn_record(engine.generate(session, t, sampling)) for t in turns]


def reuse_and_recompute(engine: Engine, turns: list[list[int]]) -> dict:
    """The same conversation with the cache kept between turns and with everything re-prefilled each turn."""
    recompute = recomputing(engine)
    return {"reuse": conversation(engine, turns), "recompute": conversation(recompute, turns)}


def edited_history(engine: Engine, turns: list[list[int]], edit_at: int) -> dict:
    """Run the turns, then resubmit the whole conversation with one earlier token changed; compare with a
    fresh session given the same edited conversation."""
    session = Session("edited")
    for t in turns:
        engine.generate(session, t, GREEDY)
    edited = list(session.tokens)
    edited[edit_at] = (edited[edit_at] + 1) % 256
    edited += [9, 8, 7]
    turn = engine.submit(session, edited, None, GREEDY)
    engine.run([turn])
    fresh = recomputing(engine)
    fresh_turn = fresh.submit(Session("fresh"), edited, None, GREEDY)
    fresh.run([fresh_turn])
    return {"edited": turn_record(turn), "fresh": turn_record(fresh_turn)}


def overflow(engine: Engine, system: list[int], turns: list[list[int]], too_long: list[int], after: list[int]):
    """A conversation that outgrows max_seq_len; each turn is rerun in a fresh session on the conversation the
    engine actually kept; a too-long turn is refused and the session goes on."""
    session = Session("long")
    session.tokens, session.turn_starts = list(system), []
    records = []
    oracle = recomputing(engine)
    for t in turns:
        turn = engine.generate(session, t, GREEDY)
        fresh = oracle.submit(Session(f"fresh{len(records)}"), turn.prompt, None, GREEDY)
        oracle.run([fresh])
        records.append({"turn": turn_record(turn), "fresh": turn_record(fresh)})
    before = list(session.tokens)
    try:
        engine.generate(session, too_long, GREEDY)
        refused = None
    except TurnRefused as e:
        refused = str(e)
    unchanged = session.tokens == before and not session.busy
    turn = engine.generate(session, after, GREEDY)
    fresh = oracle.submit(Session("fresh-after"), turn.prompt, None, GREEDY)
    oracle.run([fresh])
    return {
        "records": records,
        "refused": refused,
        "unchanged": unchanged,
        "after": turn_record(turn),
        "after_fresh": turn_record(fresh),
    }


def interleaved(engine: Engine, histories: list[list[list[int]]], final: list[list[int]], sampling=GREEDY):
    """Sessions built up to different lengths, then one more turn each, all submitted together and run as one
    batch. Returns the batched final turns and the widest forward seen."""
    sessions = [Session(f"s{i}", seed=100 + i) for i in range(len(histories))]
    for session, turns in zip(sessions, histories, strict=True):
        for t in turns:
            engine.generate(session, t, sampling)
    with recording(engine) as plans:
        turns = [engine.append_turn(s, t, sampling) for s, t in zip(sessions, final, strict=True)]
        engine.run()
    widths = [len(rows) for rows in plans]
    return {"final": [turn_record(t) for t in turns], "max_rows": max(widths)}


def alone(engine: Engine, histories: list[list[list[int]]], final: list[list[int]], sampling=GREEDY):
    """Each session's whole conversation run by itself, one session after the other."""
    out = []
    for i, (turns, last) in enumerate(zip(histories, final, strict=True)):
        session = Session(f"s{i}", seed=100 + i)
        for t in turns:
            engine.generate(session, t, sampling)
        out.append(turn_record(engine.generate(session, last, sampling)))
        engine.close_session(session)
    return out


def round_robin(engine: Engine, n_sessions: int, rounds: list[list[int]]) -> list[list[dict]]:
    """n_sessions conversations advanced one turn at a time in turn, so that with few slots they evict each other."""
    sessions = [Session(f"rr{i}") for i in range(n_sessions)]
    out = [[] for _ in sessions]
    for r, tokens in enumerate(rounds):
        for i, session in enumerate(sessions):
            new = [(t + 13 * i + r) % 256 for t in tokens]
            out[i].append(turn_record(engine.generate(session, new, GREEDY)))
    return out


def shared_system_prompt(engine: Engine, system: list[int], own: list[list[int]]) -> dict:
    """Conversations that open with the same system prompt, all submitted at once; then each alone through an engine
    that reuses nothing. Returns both, the tree blocks each one's system prompt sits in, and the pool's use."""
    turns = [engine.submit(Session(f"c{i}"), system + tokens, None, GREEDY) for i, tokens in enumerate(own)]
    engine.run()
    paths = [[n.block for n in engine.manager.tree.match(t.prompt, len(system)).nodes] for t in turns]
    used = engine.manager.allocator.num_used
    oracle = recomputing(engine)
    alone = []
    for i, tokens in enumerate(own):
        alone.append(turn_record(oracle.generate(Session(f"alone{i}"), system + tokens, GREEDY)))
    return {"shared": [turn_record(t) for t in turns], "alone": alone, "paths": paths, "used_blocks": used}


def interleaved_rounds(engine: Engine, n_sessions: int, rounds: list[list[int]], sampling=GREEDY) -> dict:
    """n_sessions conversations, each round submitting one more turn of every conversation at once."""
    sessions = [Session(f"r{i}", seed=7 + i) for i in range(n_sessions)]
    out = [[] for _ in sessions]
    for r, tokens in enumerate(rounds):
        turns = [
            engine.append_turn(s, [(t + 17 * i + r) % 250 + 2 for t in tokens], sampling)
            for i, s in enumerate(sessions)
        ]
        engine.run()
        for i, t in enumerate(turns):
            out[i].append(turn_record(t))
    usage = engine.cache_usage()
    return {"turns": out, "evicted": usage.evicted_blocks, "preemptions": usage.preemptions}


def sequence(engine: Engine, prompts: list[list[int]]) -> dict:
    """Whole conversations one after the other through one engine (each finds what the earlier ones left in the
    pool), and each through an engine that reuses nothing."""
    oracle = recomputing(engine)
    reused = [turn_record(engine.generate(Session(f"q{i}"), p, GREEDY)) for i, p in enumerate(prompts)]
    fresh = [turn_record(oracle.generate(Session(f"f{i}"), p, GREEDY)) for i, p in enumerate(prompts)]
    return {"reused": reused, "fresh": fresh}


def decode_during_prefill(engine: Engine, short: list[list[int]], long: list[int]) -> dict:
    """Short conversations start generating; a long prompt arrives. Counts, over the steps that prefill the long
    prompt, the decode rows they carry; and checks every output against each conversation alone."""
    sampling = SamplingParams(max_new_tokens=40)
    turns = [engine.submit(Session(f"d{i}"), t, None, sampling) for i, t in enumerate(short)]
    for _ in range(3):
        engine.step()
    with recording(engine) as plans:
        turns.append(engine.submit(Session("long"), long, None, sampling))
        engine.run()
    prefilling = [rows for rows in plans if any(n > 1 for n in rows)]
    oracle = recomputing(engine)
    alone = [oracle.generate(Session(f"a{i}"), p, sampling).generated for i, p in enumerate([*short, long])]
    return {
        "prefill_steps": len(prefilling),
        "decode_rows_while_prefilling": sum(rows.count(1) for rows in prefilling),
        "same_as_alone": [t.generated for t in turns] == alone,
    }
