"""Which tokens each step computes.

mixed (the default): every decoding turn's next token, then prefill chunks of the running turns, then newly admitted
turns, up to max_tokens tokens a step, so generation goes on while another conversation prefills. prefill_first
(for comparison): while any turn prefills, a step carries only prefill chunks. When the pool runs out, the newest
running turn not yet in the step is preempted: its blocks are released (what it computed stays cached in the tree
while it lasts) and it waits at the head of the queue to be recomputed.
"""

from collections import deque

from tp_infer.engine.request import Turn
from tp_infer.kv.manager import Admission, BlockManager
from tp_infer.kv.radix import common_prefix

POLICIES = ("mixed", "prefill_first")


class Scheduler:
    def __init__(self, manager: BlockManager, max_running: int, max_tokens: int, reuse: bool, policy: str = "mixed"):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy {policy!r}: must be one of {', '.join(POLICIES)}")
        self.manager, self.max_running, self.max_tokens = manager, max_running, max_tokens
        self.reuse, self.policy = reuse, policy
        self.waiting: deque[Turn] = deque()
        self.running: list[Turn] = []
        self.preemptions = 0
        self.preempted_now = False  # in the step being scheduled

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Turn, int]], list[tuple[Turn, Admission]]]:
        """The step's rows (turn, tokens to feed), and the turns admitted for it with what they found cached."""
        rows: list[tuple[Turn, int]] = []
        budget, self.preempted_now = self.max_tokens, False
        prefill_only = self.policy == "prefill_first" and (self.waiting or any(t.prefilling for t in self.running))
        # decoding turns before prefilling ones, each group oldest first
        for turn in sorted(self.running, key=lambda t: t.prefilling):
            if turn not in self.running:
                continue  # preempted for an older turn in this loop
            if prefill_only and not turn.prefilling:
                continue
            n = min(turn.extend_len, budget) if turn.prefilling else 1
            if n > 0 and self.reserve(turn, n, rows):
                rows.append((turn, n))
                budget -= n
        admitted = []
        if self.preempted_now:
            return rows, admitted  # memory is short: no new turns this step
        for turn in list(self.waiting):
            if len(self.running) >= self.max_running or budget <= 0:
                break
            if self.reuse and self.waits_for_running(turn):
                continue
            admission = self.manager.admit(turn.tokens, budget, self.reuse, turn.cache_salt)
            if admission is None:
                break  # the pool is full of running turns' blocks
            self.waiting.remove(turn)
            turn.table, turn.num_cached = admission.table, admission.reused
            self.running.append(turn)
            n = min(turn.extend_len, budget)
            rows.append((turn, n))
            budget -= n
            admitted.append((turn, admission))
        if prefill_only and not any(t.prefilling for t, _ in rows):
            # nothing left to prefill after all (the waiting turns could not be admitted): decode instead
            for turn in list(self.running):
                if turn in self.running and self.reserve(turn, 1, rows):
                    rows.append((turn, 1))
        return rows, admitted

    def reserve(self, turn: Turn, n: int, scheduled: list[tuple[Turn, int]]) -> bool:
        """Blocks for the turn's next n tokens, preempting the newest running turns not yet scheduled (the turn itself
        last) until the pool has them. False when the turn itself was preempted."""
        while not self.manager.grow(turn.table, turn.num_cached + n):
            busy = {id(t) for t, _ in scheduled}
            victims = [t for t in self.running if id(t) not in busy and t is not turn]
            victim = victims[-1] if victims else turn
            self.preempt(victim)
            if victim is turn:
                return False
        return True

    def preempt(self, turn: Turn) -> None:
        self.running.remove(turn)
        self.manager.release(turn.table, turn.tokens, turn.num_cached, keep=self.reuse)
        turn.table, turn.num_cached = None, 0
        turn.stats.preemptions += 1
        self.preemptions += 1
        self.preempted_now = True
        self.waiting.appendleft(turn)

    def waits_for_running(self, turn: Turn) -> bool:
        """A waiting turn whose prompt goes on like a running turn beyond what the tree holds waits for it, rather
        than computing the same tokens twice (eight conversations behind one system prompt compute it once)."""
        limit, tree, salt = len(turn.tokens) - 1, self.manager.tree, turn.cache_salt
        cached = tree.match(turn.tokens, limit, tree.namespace(salt)).length
        same = [t for t in self.running if t.cache_salt == salt]  # another salt's blocks are never shared
        return any(min(common_prefix(t.tokens, turn.tokens), limit) > cached for t in same)
