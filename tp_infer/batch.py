"""The batch job on rank 0: a JSONL file of conversations in, a JSONL file of replies out, resumable.

Input, one conversation a line: an `id` (string or integer) and exactly one of
  messages          [{"role", "content"}, ...]: one reply, to the rendered chat
  turns             ["user message", ...] (optional `system`): a reply after each, the cache kept between them
  prompt_token_ids  [id, ...]: one reply
  turns_token_ids   [[id, ...], ...]: a reply after each; the generated ids (stop token included) stay in the
                    history before the next turn
and optionally `max_new_tokens` (>= 1), `temperature` (>= 0), `top_p` (in (0, 1]), `top_k` (>= 0, -1 for none),
`min_p`, `min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens` and
`include_stop_str_in_output` (SamplingParams says what each does), overriding the command line, `seed` (an integer
in [-2**63, 2**64 - 1]) instead of the one drawn from (--seed, id), `chat_template_kwargs` (more variables for the
chat template, with messages or turns) and `user` (ignored, as the server does). Other keys are refused (a
misspelt option must not be ignored silently), and so are values the sampler cannot take (NaN, infinities, out of
range), with an error record naming the field. Blank lines are skipped.

Output, one line per input line, in the order conversations finish (not input order):
  {"id": ..., "line": N, "turns": [...], "error": null}
`line` is the 1-based input line. Each element of `turns` is one reply: text (null without a tokenizer), token_ids,
finish_reason ("stop" | "length"), prompt_tokens, reused_tokens (of which host_tokens were restored from host memory
and disk_tokens from disk), computed_tokens, dropped_tokens, ttft_s, decode_tokens_per_s. A line that failed has
`error` set to a one-line message; its `turns` are the replies completed before the failure (only a later turn of a
multi-turn conversation can fail after replies were made). A turn that fails while it runs (finish_reason "error" in
the engine) ends its line the same way; the other conversations and the job go on.

Up to max_batch_size conversations are in flight at once; turns of different conversations share forwards, every
turn reuses whatever prefix of it the KV pool holds (from any line: a `messages` line that continues an earlier
line's conversation computes only its new tokens), and a conversation's next turn is submitted as soon as its
previous one ends.
Every conversation samples from its own stream seeded by (--seed, id) or its `seed`, so its replies do not depend
on what it was batched with, on the world size, or on where a resumed job restarted.

Resuming: each finished conversation is written with one write() of a whole line, at once. On start, a partial last
line (a crash in mid-write) is cut off, and lines already answered are skipped: the k-th input line carrying an id
is skipped when the output holds at least k records with that id (a duplicate's error record is written only after
its first occurrence's record, so this count is exact); a line without a usable id is skipped when a record with
its line number and no usable id is there. Errors are answers too: remove a line from the output to retry it.
SIGTERM or SIGINT stops the job at a step boundary: the conversations in flight are dropped unwritten and
run_batch returns EXIT_PREEMPTED (75), the exit status of rank 0; rerunning the same command resumes. The other
ranks ignore both signals and wait for rank 0 to release them. Under torchrun (torch 2.x) the launcher does not
pass 75 on: it exits 1 both when it was signalled itself (it forwards the signal to the workers, waits for them and
raises SignalException) and when only rank 0 was signalled (ChildFailedError; its summary reads "exitcode : 75").
"""

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm import tqdm

from tp_infer.chat import Conversation, ReplyMemory, encode_messages, reply_text
from tp_infer.engine.engine import Engine, Turn
from tp_infer.engine.sampling import REQUEST_FIELDS, SamplingParams, check_seed
from tp_infer.engine.session import Session
from tp_infer.tokenizer import ROLES, ChatTokenizer

FORMS = ("messages", "turns", "prompt_token_ids", "turns_token_ids")
SAMPLING_KEYS = ("max_new_tokens", *REQUEST_FIELDS)  # a line's overrides of SamplingParams
KEYS = {"id", "system", "seed", "chat_template_kwargs", "user", *SAMPLING_KEYS, *FORMS}


class LineError(ValueError):
    """A line that cannot be run; the message says why, in one line."""


# Exit status of a batch job stopped by SIGTERM/SIGINT at a step boundary: its output is whole, rerun to resume.
EXIT_PREEMPTED = 75


# ---- the input ------------------------------------------------------------------------------------------------
def id_key(value: Any) -> str | None:
    """The resume/duplicate key of an id: a string or an integer (1 and "1" differ); None if not usable."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return json.dumps(value)
    return None


def read_line(raw: bytes) -> tuple[Any, str | None, str | None]:
    """(parsed object or None, id key or None, error or None) of one input line."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, None, f"malformed line: not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        return None, None, f"malformed JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return obj, None, f"malformed line: a JSON object is expected, got {type(obj).__name__}"
    if obj.get("id") is None:
        return obj, None, "missing id"
    key = id_key(obj["id"])
    if key is None:
        return obj, None, f"id must be a string or an integer, got {type(obj['id']).__name__}"
    return obj, key, None


def input_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of the non-blank lines, read lazily."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def _token_ids(value: Any, what: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise LineError(f"{what} must be a non-empty list of token ids")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool):
            raise LineError(f"{what}[{i}] is not an integer token id")
        if not 0 <= t < vocab_size:
            raise LineError(f"{what}[{i}] = {t} is out of the vocabulary [0, {vocab_size})")
    return value


@dataclass
class Request:
    """A validated line: the turns to run (user messages or token id lists) and its sampling."""

    form: str
    inputs: list  # messages: [messages]; turns: [str, ...]; prompt_token_ids: [ids]; turns_token_ids: [ids, ...]
    system: str | None
    sampling: SamplingParams
    seed: int | None = None  # the line's own seed, else one drawn from (--seed, id)
    tokenizer: ChatTokenizer | None = None  # renders its messages or turns (with its chat_template_kwargs)


def parse_request(
    obj: dict, sampling: SamplingParams, vocab_size: int, max_seq_len: int, tokenizer: ChatTokenizer | None
) -> Request:
    """Check a whole line before anything is submitted; raises LineError naming the problem."""
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise LineError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")
    forms = [f for f in FORMS if f in obj]
    if len(forms) != 1:
        raise LineError(f"give exactly one of {', '.join(FORMS)}" + (f" (got {', '.join(forms)})" if forms else ""))
    form = forms[0]
    value = obj[form]

    try:  # SamplingParams refuses, by name, any value the sampler cannot take
        sampling = replace(sampling, **{key: obj[key] for key in SAMPLING_KEYS if key in obj})
        seed = check_seed(obj["seed"]) if "seed" in obj else None
    except ValueError as e:
        raise LineError(str(e)) from None

    system = obj.get("system")
    if system is not None and (form != "turns" or not isinstance(system, str)):
        raise LineError("system must be a string, and only goes with turns (messages carry their own)")

    if "chat_template_kwargs" in obj and form not in ("messages", "turns"):
        raise LineError("chat_template_kwargs only goes with messages or turns")
    if form in ("messages", "turns"):
        if tokenizer is None:
            raise LineError(f"{form} needs a tokenizer: this checkpoint takes prompt_token_ids/turns_token_ids only")
        if tokenizer.format is None:
            raise LineError(f"{form} needs a chat template, and the tokenizer has none")
        try:
            tokenizer = tokenizer.with_template_kwargs(obj.get("chat_template_kwargs"))
        except ValueError as e:
            raise LineError(str(e)) from None
    if form == "messages":
        if not isinstance(value, list) or not value:
            raise LineError("messages must be a non-empty list")
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise LineError(f"messages[{i}] must be an object with role and content")
            if m.get("role") not in ROLES:
                raise LineError(f"messages[{i}]: unknown role {m.get('role')!r} (allowed: {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise LineError(f"messages[{i}]: content must be a string")
        return Request(form, [value], None, sampling, seed, tokenizer)
    if form == "turns":
        if not isinstance(value, list) or not value:
            raise LineError("turns must be a non-empty list of user messages")
        for i, m in enumerate(value):
            if not isinstance(m, str):
                raise LineError(f"turns[{i}] must be a string (the user message)")
        return Request(form, list(value), system, sampling, seed, tokenizer)
    if form == "prompt_token_ids":
        turns = [_token_ids(value, form, vocab_size)]
    else:
        if not isinstance(value, list) or not value:
            raise LineError("turns_token_ids must be a non-empty list of token id lists")
        turns = [_token_ids(ids, f"turns_token_ids[{i}]", vocab_size) for i, ids in enumerate(value)]
    for i, ids in enumerate(turns):
        # a turn alone (the overflow policy drops older ones) must fit; the engine would refuse it mid-conversation
        if len(ids) + sampling.max_new_tokens > max_seq_len:
            where = f"turn {i}: " if form == "turns_token_ids" else ""
            raise LineError(
                f"{where}{len(ids)} prompt tokens + max_new_tokens {sampling.max_new_tokens} = "
                f"{len(ids) + sampling.max_new_tokens}, more than max_seq_len {max_seq_len}"
            )
    return Request(form, turns, None, sampling, seed)


def conversation_seed(seed: int, key: str) -> int:
    """A conversation's sampling seed: a function of the job's seed and its id only."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- the output -----------------------------------------------------------------------------------------------
class Output:
    """The output file, appended to one whole line per write()."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        # ASCII JSON: a reply may hold U+2028, U+0085 and the like, which some line readers take as line breaks
        data = memoryview((json.dumps(record) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # not every file system can
            os.fsync(self.fd)
        os.close(self.fd)


def repair_tail(path: str) -> int:
    """Cut off a partial last line (the job died in mid-write); returns how many bytes were dropped. A last line
    that is a whole record and lacks only its newline (edited by hand) gets the newline instead."""
    if not os.path.exists(path):
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        end, block, keep = size, 1 << 16, 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.seek(keep)
        try:
            whole = isinstance(json.loads(f.read()), dict)
        except ValueError:
            whole = False
        if whole:
            f.write(b"\n")
            return 0
        f.truncate(keep)
        return size - keep


def answered(path: str) -> tuple[Counter, set[int], int]:
    """What the output already holds: records per id key, line numbers of records without a usable id, and the
    number of unreadable lines (ignored)."""
    per_key, lines, bad = Counter(), set(), 0
    if not os.path.exists(path):
        return per_key, lines, bad
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
                continue
            key = id_key(record.get("id"))
            if key is not None:
                per_key[key] += 1
            elif isinstance(record.get("line"), int):
                lines.add(record["line"])
    return per_key, lines, bad


# ---- running --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """A conversation in flight: one turn in the engine at a time."""

    line: int
    id: Any
    key: str
    request: Request
    session: Session
    conversation: Conversation | None = None
    next_input: int = 0
    turn: Turn | None = None
    replies: list[dict] = field(default_factory=list)


class BatchJob:
    def __init__(
        self,
        engine: Engine,
        tokenizer: ChatTokenizer | None,
        input_file: str,
        output_file: str,
        sampling: SamplingParams,
        seed: int,
        replies: ReplyMemory,
    ):
        self.engine, self.tokenizer, self.sampling, self.seed = engine, tokenizer, sampling, seed
        self.input_file = input_file
        self.vocab_size = engine.runner.model.args.vocab_size
        self.stop_signal: int | None = None  # set by the signal handler; the loop stops at the next step boundary
        self.output_file, self.output = output_file, None
        self.repaired = repair_tail(output_file)
        # what the output held when the job started: it decides which lines to skip
        self.done_before, self.lines_done, self.unreadable = answered(output_file)
        self.first_line: dict[str, int] = {}
        self.total, self.skipped = self.plan()
        self.jobs: dict[int, Job] = {}  # by id(turn)
        self.answered: set[str] = set()  # id keys whose first occurrence was written by this run
        self.deferred: dict[str, list[dict]] = defaultdict(list)  # duplicates waiting for their first occurrence
        self.written, self.errors, self.tokens = 0, 0, 0
        self.replies = replies  # a messages line that continues an earlier line's conversation gets its ids
        self.held: list[Job] = []  # such lines, until the reply they hold is generated

    def plan(self) -> tuple[int, int]:
        """A first pass over the input: where each id first occurs, and how many lines are still to answer."""
        seen, todo, skipped = Counter(), 0, 0
        for number, raw in input_lines(self.input_file):
            _, key, _ = read_line(raw)
            if self.is_done(number, key, seen):
                skipped += 1
            else:
                todo += 1
            if key is not None:
                self.first_line.setdefault(key, number)
        return todo, skipped

    def is_done(self, number: int, key: str | None, seen: Counter) -> bool:
        if key is None:
            return number in self.lines_done
        occurrence = seen[key]
        seen[key] += 1
        return occurrence < self.done_before[key]

    # ---- the loop ----
    def run(self) -> bool:
        """True when every line is answered, False when stopped by a signal first."""
        lines = self.todo_lines()
        exhausted = False
        live = sys.stderr.isatty()  # a log file (SLURM) gets a line every 30 s, not a stream of redraws
        interval = 0.5 if live else 30.0
        self.bar = tqdm(
            total=self.total,
            desc="conversations",
            unit="conv",
            file=sys.stderr,
            dynamic_ncols=live,
            mininterval=0.1 if live else interval,
        )
        self.output = Output(self.output_file)
        started = shown = time.perf_counter()
        try:
            while True:
                while not exhausted and self.in_flight < self.engine.max_running and self.stop_signal is None:
                    item = next(lines, None)
                    if item is None:
                        exhausted = True
                    else:
                        self.begin(*item)
                if not self.in_flight and exhausted:
                    return True
                if self.stop_signal is not None:
                    if not self.in_flight and next(lines, None) is None:
                        return True  # the signal came after the last line was answered
                    self.drop_in_flight()
                    return False
                ended = self.engine.step()
                if not ended and not self.engine.scheduler.has_work:
                    raise RuntimeError("batch: conversations in flight but nothing for the engine to run")
                for turn in ended:
                    self.turn_ended(turn)
                now = time.perf_counter()
                if now - shown > interval:
                    shown = now
                    self.bar.set_postfix_str(f"{self.tokens / (now - started):.1f} tok/s, {self.cache_note()}")
        finally:
            elapsed = time.perf_counter() - started
            self.bar.set_postfix_str(f"{self.tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s, {self.cache_note()}")
            self.bar.close()
            self.output.close()

    def cache_note(self) -> str:
        return self.engine.cache_usage().describe()

    def todo_lines(self) -> Iterator[tuple[int, tuple]]:
        """(line number, read_line()) of the lines to answer, read lazily."""
        seen = Counter()
        for number, raw in input_lines(self.input_file):
            obj, key, error = read_line(raw)
            if not self.is_done(number, key, seen):
                yield number, (obj, key, error)

    def begin(self, number: int, parsed: tuple) -> None:
        obj, key, error = parsed
        if error is not None:  # no usable id: the record's id is null, its line number names it
            self.write(number, None, None, [], error)
            return
        if self.first_line[key] != number:
            error = f"duplicate id {key} (first on line {self.first_line[key]})"
            record = self.record(number, obj["id"], [], error)
            if self.done_before[key] > 0 or key in self.answered:
                self.emit(record, error=True)
            else:
                self.deferred[key].append(record)
            return
        try:
            request = parse_request(obj, self.sampling, self.vocab_size, self.engine.max_seq_len, self.tokenizer)
        except LineError as e:
            self.write(number, obj["id"], key, [], str(e))
            return
        seed = request.seed if request.seed is not None else conversation_seed(self.seed, key)
        session = Session(f"batch:{key}", seed=seed)
        job = Job(number, obj["id"], key, request, session)
        self.advance(job)

    def advance(self, job: Job) -> None:
        """Submit the job's next turn, or write it when it has none left."""
        if job.next_input == len(job.request.inputs):
            self.finish(job, None)
            return
        request, value = job.request, job.request.inputs[job.next_input]
        try:
            if request.form == "messages":
                ids, starts = encode_messages(request.tokenizer, value, self.replies)
                if self.continues_in_flight(ids):
                    self.held.append(job)  # its history's reply is still being generated: take its ids after
                    return
                turn = self.engine.submit(job.session, ids, starts, request.sampling, self.count)
            elif request.form == "turns":
                if job.conversation is None:
                    job.conversation = Conversation.start(
                        self.engine, request.tokenizer, job.session.id, request.system, job.session.seed
                    )
                    job.session = job.conversation.session
                turn = job.conversation.ask(value, request.sampling, self.count)
            elif request.form == "prompt_token_ids":
                turn = self.engine.submit(job.session, value, None, request.sampling, self.count)
            else:
                turn = self.engine.append_turn(job.session, value, request.sampling, self.count)
        except ValueError as e:  # TurnRefused (too long for max_seq_len), TokenizerError (chat template)
            self.finish(job, f"{self.where(job, job.next_input)}{e}")
            return
        except Exception as e:  # anything else this line's input sets off fails this line only
            self.finish(job, f"{self.where(job, job.next_input)}{type(e).__name__}: {e}".splitlines()[0])
            return
        job.next_input += 1
        job.turn = turn
        self.jobs[id(turn)] = job

    @staticmethod
    def where(job: Job, turn: int) -> str:
        """How an error names the turn of a multi-turn line it happened in."""
        return f"turn {turn}: " if len(job.request.inputs) > 1 else ""

    def continues_in_flight(self, ids: list[int]) -> bool:
        """Whether a conversation goes on from the prompt of a turn still in flight (a messages line holding an
        earlier line's conversation and its reply)."""
        return any(
            len(j.turn.prompt) < len(ids) and ids[: len(j.turn.prompt)] == j.turn.prompt for j in self.jobs.values()
        )

    def count(self, token: int) -> None:
        self.tokens += 1

    def turn_ended(self, turn: Turn) -> None:
        job = self.jobs.pop(id(turn))
        job.turn = None
        if turn.finish_reason == "error":
            self.finish(job, f"{self.where(job, job.next_input - 1)}{turn.error}")
            self.release_held()
            return
        generated = turn.generated
        if job.conversation is not None:
            job.conversation.record(turn)  # the history, as the template reads it
        text = None
        if self.tokenizer is not None:  # as the line's sampling shows it
            text = reply_text(self.tokenizer, generated, turn.finish_reason, job.request.sampling)
        if text is not None:
            self.replies.remember(turn.prompt, text, generated)
        s = turn.stats
        job.replies.append(
            {
                "text": text,
                "token_ids": list(generated),
                "finish_reason": turn.finish_reason,
                "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.reused_tokens,
                "host_tokens": s.host_tokens,
                "disk_tokens": s.disk_tokens,
                "computed_tokens": s.computed_tokens,
                "dropped_tokens": s.dropped_tokens,
                "ttft_s": round(s.ttft_s, 6),
                "decode_tokens_per_s": round(s.decode_tokens_per_s, 3),
            }
        )
        self.advance(job)
        self.release_held()

    def release_held(self) -> None:
        """Submit again the lines that waited for a reply in flight."""
        held, self.held = self.held, []
        for waiting in held:
            self.advance(waiting)

    def finish(self, job: Job, error: str | None) -> None:
        self.engine.close_session(job.session)
        self.write(job.line, job.id, job.key, job.replies, error)

    @property
    def in_flight(self) -> int:
        return len(self.jobs) + len(self.held)

    def drop_in_flight(self) -> None:
        for job in self.jobs.values():
            self.engine.cancel(job.turn)
            self.engine.close_session(job.session)
        self.jobs.clear()
        self.held.clear()

    # ---- writing ----
    @staticmethod
    def record(number: int, id_value: Any, turns: list[dict], error: str | None) -> dict:
        return {"id": id_value, "line": number, "turns": turns, "error": error}

    def write(self, number: int, id_value: Any, key: str | None, turns: list[dict], error: str | None) -> None:
        self.emit(self.record(number, id_value, turns, error), error is not None)
        if key is not None:
            self.answered.add(key)
            for record in self.deferred.pop(key, []):
                self.emit(record, error=True)

    def emit(self, record: dict, error: bool) -> None:
        self.output.write(record)
        self.written += 1
        self.errors += error
        self.bar.update(1)


def run_batch(
    engine: Engine,
    tokenizer: ChatTokenizer | None,
    input_file: str,
    output_file: str,
    sampling: SamplingParams,
    seed: int,
    replies: ReplyMemory | None = None,
) -> int:
    """Answer every line of input_file not yet in output_file. Returns 0 when all are answered, EXIT_PREEMPTED
    when SIGTERM/SIGINT stopped the job first (rerun to resume). Error records do not change the status."""
    received: list[int] = []
    job: BatchJob | None = None

    def on_signal(signum, frame) -> None:
        received.append(signum)
        if job is not None:
            job.stop_signal = signum

    previous = {}
    if threading.current_thread() is threading.main_thread():  # elsewhere Python cannot take signals
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        job = BatchJob(
            engine,
            tokenizer,
            input_file,
            output_file,
            sampling,
            seed,
            replies if replies is not None else ReplyMemory(),
        )
        if received:  # a signal during the first pass over the files
            job.stop_signal = received[0]
        if job.repaired:
            say(f"cut a partial last line ({job.repaired} bytes) off {output_file}")
        if job.unreadable:
            say(f"{job.unreadable} unreadable lines in {output_file} ignored")
        if job.skipped:
            say(f"{job.skipped} lines already answered in {output_file}, skipped")
        complete = job.run()
    finally:
        if not received:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # else the handlers stay: torchrun forwards the signal the worker may have had already, and a second one
        # must not kill the process while it shuts the other ranks down
    t = engine.totals
    summary = (
        f"{job.written} lines written ({job.errors} errors), {job.tokens} tokens generated; prompts "
        f"{t.prompt_tokens} tokens: {t.reused_tokens} cached (host {t.host_tokens}, disk {t.disk_tokens}), "
        f"{t.computed_tokens} computed"
    )
    if complete:
        say(summary)
        return 0
    name = signal.Signals(job.stop_signal).name
    say(f"{summary}; stopped by {name}: the conversations in flight were dropped, rerun to resume")
    return EXIT_PREEMPTED


def say(text: str) -> None:
    print(f"batch: {text}", file=sys.stderr, flush=True)
