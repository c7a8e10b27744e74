"""Drivers run on rank 0 by rank_fns.serve: each gets an Engine and returns plain data for the test to check."""

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
        "dropped": s.dropped_tokens,
        "prompt_ids": list(turn.prompt),
    }


def conversation(engine: Engine, turns: list[list[int]], sampling=GREEDY, session_id="s") -> list[dict]:
    session = Session(session_id)
    return [turn_record(engine.generate(session, t, sampling)) for t in turns]


def reuse_and_recompute(engine: Engine, turns: list[list[int]]) -> dict:
    """The same conversation with the cache kept between turns and with everything re-prefilled each turn."""
    recompute = Engine(engine.runner, reuse=False)
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
    fresh_turn = engine.submit(Session("fresh"), edited, None, GREEDY)
    engine.run([fresh_turn])
    return {"edited": turn_record(turn), "fresh": turn_record(fresh_turn)}


def overflow(engine: Engine, system: list[int], turns: list[list[int]], too_long: list[int], after: list[int]):
    """A conversation that outgrows max_seq_len; each turn is rerun in a fresh session on the conversation the
    engine actually kept; a too-long turn is refused and the session goes on."""
    session = Session("long")
    session.tokens, session.turn_starts = list(system), []
    records = []
    for t in turns:
        turn = engine.generate(session, t, GREEDY)
        fresh = engine.submit(Session(f"fresh{len(records)}"), turn.prompt, None, GREEDY)
        engine.run([fresh])
        records.append({"turn": turn_record(turn), "fresh": turn_record(fresh)})
    before = list(session.tokens)
    try:
        engine.generate(session, too_long, GREEDY)
        refused = None
    except TurnRefused as e:
        refused = str(e)
    unchanged = session.tokens == before and not session.busy
    turn = engine.generate(session, after, GREEDY)
    fresh = engine.submit(Session("fresh-after"), turn.prompt, None, GREEDY)
    engine.run([fresh])
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
    widths = []
    forward = engine.runner.forward

    def counting_forward(plan):
        widths.append(plan.tokens.shape[0])
        return forward(plan)

    engine.runner.forward = counting_forward
    turns = [engine.append_turn(s, t, sampling) for s, t in zip(sessions, final, strict=True)]
    engine.run()
    engine.runner.forward = forward
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
