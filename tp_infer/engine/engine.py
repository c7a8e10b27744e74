"""The multi-turn engine on rank 0: every turn, from a session or from nowhere, takes its longest cached prefix from
the prefix tree and prefills only the rest (token-exact); turns of many conversations share each step's forward.
A step is three moves: the scheduler picks the rows, the runner computes them on every rank, and the results are
taken in (tokens sampled, blocks committed to the tree, ended turns released). With tiers under the pool, the turns
about to be admitted first have what the disk holds of them read into host memory."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tp_infer.engine.request import Turn
from tp_infer.engine.runner import ModelRunner, StepPlan
from tp_infer.engine.sampling import SamplingParams, check_seed, sample
from tp_infer.engine.scheduler import Scheduler
from tp_infer.engine.session import Session, Totals
from tp_infer.kv.manager import Admission, BlockManager, Dropped


class TurnRefused(ValueError):
    """A turn that cannot be run (it cannot fit in max_seq_len or in the pool); its session is left as it was."""


class Engine:
    """Runs turns over the runner's KV pool, max_batch_size of them at once. With reuse=False every turn re-prefills
    its whole conversation, as DeepSeek's reference does, for comparison."""

    def __init__(
        self,
        runner: ModelRunner,
        reuse: bool = True,
        max_num_batched_tokens: int = 512,
        policy: str = "mixed",
        manager: BlockManager | None = None,
    ):
        """manager: the pool's bookkeeping, when it has tiers or another engine on the same runner keeps it."""
        args = runner.model.args
        self.runner, self.reuse = runner, reuse
        self.max_seq_len, self.max_running = args.max_seq_len, args.max_batch_size
        self.manager = manager or BlockManager(runner.pool.num_blocks, runner.pool.block_size)
        self.scheduler = Scheduler(self.manager, args.max_batch_size, max_num_batched_tokens, reuse, policy)
        self.totals = Totals()
        self.generators: dict[str, torch.Generator] = {}

    # ---- submitting turns -------------------------------------------------------------------------------
    def append_turn(self, session: Session, new_tokens: list[int], sampling: SamplingParams, on_token=None) -> Turn:
        """A new turn made of `new_tokens` appended to the conversation (console, multi-turn batch)."""
        prompt = session.tokens + list(new_tokens)
        return self.submit(session, prompt, [*session.turn_starts, len(session.tokens)], sampling, on_token)

    def submit(
        self,
        session: Session,
        conversation: list[int],
        turn_starts: list[int] | None,
        sampling: SamplingParams,
        on_token: Callable[[int], None] | None = None,
    ) -> Turn:
        """A turn given as the whole conversation; it reuses whatever prefix of it the pool holds. turn_starts marks
        where turns begin (for the overflow policy); None: the conversation is one turn."""
        if session.busy:
            raise TurnRefused(f"session {session.id} already has a turn in progress")
        try:
            check_seed(session.seed)
        except ValueError as e:
            raise TurnRefused(str(e)) from None
        prompt, starts, dropped = self.admissible(conversation, turn_starts, sampling.max_new_tokens)
        turn = Turn(session, prompt, starts, sampling, on_token, tokens=list(prompt))
        turn.stats.dropped_tokens = dropped
        session.busy = True
        self.scheduler.waiting.append(turn)
        return turn

    def admissible(
        self, conversation: list[int], turn_starts: list[int] | None, max_new_tokens: int
    ) -> tuple[list[int], list[int], int]:
        """The prompt, turn starts and tokens dropped that the overflow policy makes of a conversation; raises
        TurnRefused for one that cannot run. Reads only fixed settings: safe from any thread."""
        if not conversation:
            raise TurnRefused("a turn needs at least one token")
        prompt, starts, dropped = self.fit(conversation, list(turn_starts) if turn_starts else [0], max_new_tokens)
        needed = self.manager.blocks_for(len(prompt) + max_new_tokens)
        if needed > self.manager.num_blocks:
            raise TurnRefused(
                f"turn needs {needed} cache blocks for {len(prompt)} prompt tokens + max_new_tokens "
                f"{max_new_tokens}, more than the pool's {self.manager.num_blocks}"
            )
        return prompt, starts, dropped

    def fit(self, tokens: list[int], starts: list[int], max_new_tokens: int) -> tuple[list[int], list[int], int]:
        """Overflow policy: while the prompt plus max_new_tokens exceeds max_seq_len, drop the oldest whole turn
        after the system prompt. Refuses a turn that does not fit even alone with the system prompt."""
        dropped = 0
        while len(tokens) + max_new_tokens > self.max_seq_len and len(starts) > 1:
            cut = starts[1] - starts[0]
            tokens = tokens[: starts[0]] + tokens[starts[1] :]
            starts = [s - cut for s in starts[1:]]
            dropped += cut
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise TurnRefused(
                f"turn needs {len(tokens)} prompt tokens + max_new_tokens {max_new_tokens} = "
                f"{len(tokens) + max_new_tokens}, more than max_seq_len {self.max_seq_len}"
            )
        return tokens, starts, dropped

    # ---- running ----------------------------------------------------------------------------------------
    def run(self, turns: list[Turn] | None = None, interrupted: Callable[[], bool] | None = None) -> None:
        """Step until the given turns (default: all submitted work) are done, or until interrupted() says so
        (checked between steps, so every rank stops at the same step boundary)."""
        while self.scheduler.has_work:
            if turns is not None and all(t.done for t in turns):
                return
            if interrupted is not None and interrupted():
                return
            self.step()

    def generate(self, session: Session, new_tokens: list[int], sampling: SamplingParams, on_token=None) -> Turn:
        """Append a turn and run it to the end."""
        turn = self.append_turn(session, new_tokens, sampling, on_token)
        self.run([turn])
        return turn

    def step(self) -> list[Turn]:
        """Schedule, run one forward on every rank, take the results in; returns the turns that ended."""
        step = self.schedule()
        logits = self.runner.forward(step.plan) if step.plan is not None else None
        return self.postprocess(step, logits if step.rows else [])

    def schedule(self) -> "Step":
        """The scheduler's rows, decode rows first (they attend as one group), and the plan every rank runs."""
        self.prefetch()
        rows, admitted = self.scheduler.schedule()
        for turn, admission in admitted:
            self.start(turn, admission)
        rows.sort(key=lambda row: row[1] > 1)
        copies, transfers = self.manager.take_copies(), self.manager.take_transfers()
        plan = None
        if rows or transfers:
            plan = StepPlan.from_rows([self.feed(t, n) for t, n in rows], copies, transfers)
        return Step(rows, copies, plan)

    def prefetch(self) -> None:
        """Read from disk into host memory what the tiers hold of the prompts the scheduler may admit next (one
        plan of loads, before the step's), so that admitting them finds it there."""
        tiers = self.manager.tiers
        if not self.reuse or tiers is None or not tiers.reads_disk:
            return
        budget, loads = tiers.host.num_slots, []
        for turn in list(self.scheduler.waiting)[: self.max_running - len(self.scheduler.running)]:
            if turn.looked_up == len(turn.tokens):
                continue
            turn.looked_up = len(turn.tokens)
            loads += self.manager.prefetch(turn.tokens, budget - len(loads), turn.cache_salt)
        if loads:
            ok = self.runner.load(StepPlan.from_rows([], transfers=self.manager.take_transfers()))
            self.manager.loaded(loads, ok)

    def flush(self) -> int:
        """Save what the pool and host memory hold to the disk tier, for the next job; returns the blocks saved."""
        saved = self.manager.flush()
        transfers = self.manager.take_transfers()
        if transfers:
            self.runner.forward(StepPlan.from_rows([], transfers=transfers))
        return saved

    def drop_cache(self) -> Dropped:
        """A cache flush between steps: drop every cached block no running turn holds, in the pool and the tiers
        below; the files deleted are deleted on every rank."""
        dropped = self.manager.drop_cache()
        transfers = self.manager.take_transfers()
        if transfers:
            self.runner.forward(StepPlan.from_rows([], transfers=transfers))
        return dropped

    def feed(self, turn: Turn, n: int) -> tuple[list[int], int, list[int]]:
        """A plan row: the blocks covering the turn's next n positions, where they start, and their tokens."""
        start, end = turn.num_cached, turn.num_cached + n
        return turn.table.blocks[: self.manager.blocks_for(end)], start, turn.tokens[start:end]

    def postprocess(self, step: "Step", logits) -> list[Turn]:
        self.manager.copies_done(step.copies)
        ended = []
        for (turn, n), row_logits in zip(step.rows, logits, strict=True):
            turn.num_cached += n
            if self.reuse:
                self.manager.commit(turn.table, turn.tokens, turn.num_cached)
            if turn.extend_len:
                continue  # a prompt longer than one chunk goes on in the next step
            if turn.closing:  # its last token is now cached too: the next turn finds its whole history
                self.finish(turn)
                ended.append(turn)
                continue
            try:
                generator = self.generator(turn.session)
                self.accept(turn, sample(row_logits, turn.sampling, generator, turn.tokens, len(turn.generated)))
            except Exception as e:  # this turn's failure (its sampling, its client's callback): it ends alone
                self.fail(turn, e)
            if turn.closing and (not self.reuse or turn.error is not None):  # nothing to keep: no closing step
                self.finish(turn)
                ended.append(turn)
        return ended

    def fail(self, turn: Turn, error: Exception) -> None:
        """End a turn on its own failure: finish_reason "error", the one-line reason in turn.error. Its engine,
        job and the other turns go on."""
        turn.finish_reason = "error"
        turn.error = f"{type(error).__name__}: {error}".splitlines()[0]

    def start(self, turn: Turn, admission: Admission) -> None:
        """A turn enters the pool with what it found cached."""
        turn.admissions += 1
        s, reused = turn.stats, admission.reused
        if turn.admissions > 1:  # resumed after a preemption
            s.recomputed_tokens += len(turn.tokens) - reused
            return
        session = turn.session
        session.tokens, session.turn_starts = turn.tokens, turn.turn_starts
        s.prompt_tokens, s.reused_tokens, s.computed_tokens = len(turn.prompt), reused, len(turn.prompt) - reused
        s.copied_tokens, s.prev_pos, s.end_pos = admission.copied, reused, len(turn.prompt)
        s.host_tokens, s.disk_tokens = admission.from_host, admission.from_disk

    def accept(self, turn: Turn, token: int) -> None:
        """A sampled token joins the history (the session's token list) and is fed to the cache next step."""
        now = time.perf_counter()
        if not turn.generated:
            turn.first_token_at = now
        turn.last_token_at = now
        turn.generated.append(token)
        turn.tokens.append(token)
        if turn.on_token is not None:
            turn.on_token(token)
        if turn.sampling.stops_at(token, len(turn.generated) - 1):
            turn.finish_reason = "stop"
        elif len(turn.generated) >= turn.sampling.max_new_tokens or len(turn.tokens) >= self.max_seq_len:
            turn.finish_reason = "length"

    def cancel(self, turn: Turn) -> None:
        """Stop generating (Ctrl-C): what was generated stays in the history, what was computed in the cache."""
        if turn.done:
            return
        counted = turn.admissions > 0
        turn.finish_reason = "cancelled"
        self.finish(turn, count=counted)

    def finish(self, turn: Turn, count: bool = True) -> None:
        """The turn leaves the engine; what it computed stays cached in the prefix tree (with reuse)."""
        scheduler = self.scheduler
        if turn in scheduler.waiting:
            scheduler.waiting.remove(turn)
        if turn in scheduler.running:
            scheduler.running.remove(turn)
        if turn.table is not None:
            self.manager.release(turn.table, turn.tokens, turn.num_cached, keep=self.reuse)
            turn.table = None
        turn.done, turn.session.busy = True, False
        s = turn.stats
        s.generated_tokens = len(turn.generated)
        s.ttft_s = turn.first_token_at - turn.submitted if turn.generated else 0.0
        span = turn.last_token_at - turn.first_token_at
        s.decode_tokens_per_s = (len(turn.generated) - 1) / span if span > 0 else 0.0
        if count:
            turn.session.totals.add(s)
            self.totals.add(s)

    def cache_usage(self) -> "CacheUsage":
        manager, tiers = self.manager, self.manager.tiers
        tokens, blocks = manager.usage()
        host, disk = (tiers.host, tiers.disk) if tiers else (None, None)
        return CacheUsage(
            tokens,
            blocks,
            manager.num_blocks,
            manager.block_size,
            manager.tree.evicted_blocks,
            self.scheduler.preemptions,
            len(host) if host else 0,
            host.num_slots if host else 0,
            len(disk) if disk else 0,
            disk.capacity if disk else 0,
        )

    def generator(self, session: Session) -> torch.Generator:
        """Per-session random stream, so a sampled conversation does not depend on what it was batched with."""
        if session.id not in self.generators:
            self.generators[session.id] = torch.Generator().manual_seed(session.seed)
        return self.generators[session.id]

    def close_session(self, session: Session) -> None:
        """Forget a session; its history stays cached for whoever sends it again, until evicted."""
        self.generators.pop(session.id, None)


@dataclass
class Step:
    """One step: the rows (turn, tokens fed), decode rows first, the block copies that run before, and the plan."""

    rows: list[tuple[Turn, int]]
    copies: list[tuple[int, int]]
    plan: StepPlan | None


@dataclass
class CacheUsage:
    """The pool as rank 0 sees it: tokens the prefix tree holds, blocks in use (by the tree or by running turns)."""

    cached_tokens: int
    used_blocks: int
    total_blocks: int
    block_size: int
    evicted_blocks: int
    preemptions: int
    host_blocks: int = 0  # held in host memory, of host_capacity
    host_capacity: int = 0
    disk_blocks: int = 0  # files on disk, of disk_capacity
    disk_capacity: int = 0

    def describe(self) -> str:
        share = self.used_blocks / self.total_blocks
        text = (
            f"cache {self.cached_tokens} tokens, {self.used_blocks}/{self.total_blocks} blocks of "
            f"{self.block_size} ({share:.1%}), {self.evicted_blocks} evicted, {self.preemptions} preemptions"
        )
        if self.host_capacity:
            text += f"; host memory {self.host_blocks}/{self.host_capacity} blocks"
        if self.disk_capacity:
            text += f"; disk {self.disk_blocks}/{self.disk_capacity} blocks"
        return text
