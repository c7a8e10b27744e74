"""The engine runs on rank 0's main thread (it drives every rank's forward); the HTTP server runs on its own thread
and event loop. Requests cross over through an inbox; each one's tokens come back on its own asyncio queue."""

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tp_infer.engine.engine import Engine, TurnRefused
from tp_infer.engine.request import Turn
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session


class Busy(Exception):
    """As many requests are in flight as the server takes: answered 503."""


@dataclass(eq=False)
class Call:
    """One request in flight. Events on `events`: ("token", id, time), then ("done", turn) or ("error", message)."""

    prompt: list[int]
    turn_starts: list[int] | None
    sampling: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    turn: Turn | None = None
    settled: bool = False  # done, failed or cancelled: counted out of the in-flight total

    def push(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int):
        self.engine = engine
        self.max_in_flight = engine.max_running + max_waiting
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.calls: dict[int, Call] = {}  # by id(turn)
        self.numbers = itertools.count()
        self.healthy = True

    # ---- the HTTP server's thread ----
    def submit(self, call: Call) -> None:
        with self.lock:
            if self.in_flight >= self.max_in_flight:
                raise Busy(f"{self.in_flight} requests in flight, the most this server takes")
            self.in_flight += 1
        self.inbox.put(("submit", call))

    def cancel(self, call: Call) -> None:
        """The client went away (or a stop string was met): stop the turn on every rank, release its blocks."""
        self.inbox.put(("cancel", call))

    # ---- the engine's thread ----
    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Take requests and step the engine until should_stop(); then cancel whatever is in flight."""
        try:
            while not should_stop():
                busy = self.engine.scheduler.has_work
                self.take_inbox(wait=not busy)
                if self.engine.scheduler.has_work:
                    for turn in self.engine.step():
                        self.settle(self.calls.pop(id(turn)), "done", turn)
            for call in list(self.calls.values()):
                self.engine.cancel(call.turn)
                self.settle(call, "done", call.turn)
            self.calls.clear()
        finally:
            self.healthy = False

    def take_inbox(self, wait: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, call = item
            if kind == "submit":
                self.start(call)
            elif call.turn is not None and not call.settled:
                self.engine.cancel(call.turn)
                self.calls.pop(id(call.turn), None)
                self.settle(call, "done", call.turn)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def start(self, call: Call) -> None:
        session = Session(f"api-{next(self.numbers)}", seed=call.seed)
        try:
            call.turn = self.engine.submit(
                session, call.prompt, call.turn_starts, call.sampling, lambda t: call.push("token", t, time.monotonic())
            )
        except TurnRefused as e:
            self.settle(call, "error", str(e))
            return
        self.calls[id(call.turn)] = call

    def settle(self, call: Call, *event) -> None:
        if call.settled:
            return
        call.settled = True
        if call.turn is not None:
            self.engine.close_session(call.turn.session)
        with self.lock:
            self.in_flight -= 1
        call.push(*event)
