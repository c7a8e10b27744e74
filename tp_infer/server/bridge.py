"""The engine runs on rank 0's main thread (it drives every rank's forward); the HTTP server runs on its own thread
and event loop. Requests cross over through an inbox; each one's tokens come back on its own asyncio queue."""

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tp_infer.engine.engine import Engine
from tp_infer.engine.request import Turn
from tp_infer.engine.sampling import SamplingParams
from tp_infer.engine.session import Session


class Busy(Exception):
    """As many requests are in flight as the server takes, or the engine has stopped: answered 503."""


@dataclass(eq=False)
class Call:
    """One request in flight. Events on `events`: ("token", id, time), then ("done", turn) or, without a reply,
    ("refused", message) (the turn cannot run: 400), ("failed", message) (it failed inside the engine: 500) or
    ("stopped", message) (the engine stopped: 503). The server sets `delivered` once its client has the answer."""

    prompt: list[int]
    turn_starts: list[int] | None
    sampling: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    cache_salt: str | None = None  # keeps the turn's cached prefixes apart from those of other salts
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    turn: Turn | None = None
    settled: bool = False  # done, failed or cancelled: counted out of the in-flight total
    delivered: threading.Event = field(default_factory=threading.Event)

    def push(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(eq=False)
class Command:
    """Work for the engine's thread between two steps (a cache flush): run(engine) there; its result, or its
    exception, is set on `future` in the HTTP server's loop."""

    run: Callable[[Engine], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def execute(self, engine: Engine) -> None:
        """Run it; an exception is the engine's failure (it only keeps books and runs transfers on every rank):
        told to the caller, then raised on."""
        try:
            result = self.run(engine)
        except BaseException as e:
            self.fail(e)
            raise
        self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_result(result))

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_exception(error))


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
            if not self.healthy:
                raise Busy("the engine has stopped")
            if self.in_flight >= self.max_in_flight:
                raise Busy(f"{self.in_flight} requests in flight, the most this server takes")
            self.in_flight += 1
        self.inbox.put(("submit", call))

    async def command(self, run: Callable[[Engine], object]) -> object:
        """Run `run(engine)` on the engine's thread between two steps, and return what it returns."""
        loop = asyncio.get_running_loop()
        command = Command(run, loop, loop.create_future())
        with self.lock:
            if not self.healthy:
                raise Busy("the engine has stopped")
            self.inbox.put(("command", command))
        return await command.future

    def cancel(self, call: Call) -> None:
        """The client went away (or a stop string was met): stop the turn on every rank, release its blocks."""
        self.inbox.put(("cancel", call))

    # ---- the engine's thread ----
    def serve(self, should_stop: Callable[[], bool], grace_s: float = 5.0) -> None:
        """Take requests and step the engine until should_stop(); then cancel whatever is in flight. If the engine
        fails (a rank lost, an exception), every request in flight is answered "stopped" and given up to grace_s
        to reach its client before the failure goes on up and ends the job."""
        try:
            while not should_stop():
                busy = self.engine.scheduler.has_work
                self.take_inbox(wait=not busy)
                if self.engine.scheduler.has_work:
                    for turn in self.engine.step():
                        self.settle(self.calls.pop(id(turn)), *self.outcome(turn))
            for call in list(self.calls.values()):
                self.engine.cancel(call.turn)
                self.settle(call, "done", call.turn)
            self.calls.clear()
            self.stop_all("the server is stopping")  # what is still in the inbox
        except BaseException as e:
            told = self.stop_all(f"the server has failed and is stopping ({type(e).__name__}: {e})")
            deadline = time.monotonic() + grace_s
            for call in told:
                call.delivered.wait(max(0.0, deadline - time.monotonic()))
            raise
        finally:
            self.healthy = False

    @staticmethod
    def outcome(turn: Turn) -> tuple:
        """The event that ends a call whose turn has ended: its reply, or its own failure (the engine goes on)."""
        return ("failed", f"the turn failed: {turn.error}") if turn.error is not None else ("done", turn)

    def stop_all(self, message: str) -> list[Call]:
        """Answer every call in flight or in the inbox "stopped"; no call is taken after this. Returns them."""
        with self.lock:
            self.healthy = False
        told = list(self.calls.values())
        self.calls.clear()
        while True:
            try:
                kind, call = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                told.append(call)
            elif kind == "command":
                call.fail(Busy(message))
        for call in told:
            self.settle(call, "stopped", message, close=False)
        return told

    def take_inbox(self, wait: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, call = item
            if kind == "submit":
                self.start(call)
            elif kind == "command":
                call.execute(self.engine)
            elif call.turn is not None and not call.settled:
                self.engine.cancel(call.turn)
                self.calls.pop(id(call.turn), None)
                self.settle(call, "done", call.turn)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def start(self, call: Call) -> None:
        session = Session(f"api-{next(self.numbers)}", seed=call.seed, cache_salt=call.cache_salt)
        try:
            call.turn = self.engine.submit(
                session, call.prompt, call.turn_starts, call.sampling, lambda t: call.push("token", t, time.monotonic())
            )
        except ValueError as e:  # TurnRefused, or a value the engine refuses: this request's alone
            self.settle(call, "refused", str(e))
            return
        self.calls[id(call.turn)] = call

    def settle(self, call: Call, *event, close: bool = True) -> None:
        """The call's last event; close=False leaves the engine alone (it has failed)."""
        if call.settled:
            return
        call.settled = True
        if call.turn is not None and close:
            self.engine.close_session(call.turn.session)
        with self.lock:
            self.in_flight -= 1
        call.push(*event)
