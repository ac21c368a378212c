"""Continuous batching: a thread that hands submitted requests to a PagedEngine and steps it.

    scheduler = Scheduler(engine, max_waiting=64)
    scheduler.start()
    ticket = scheduler.submit(request, emit)   # emit(Update) is called from the scheduler's thread
    ticket.cancel()                            # the client went away: its place is free at once
    scheduler.close()                          # lets every admitted and waiting request finish, then stops

Each loop: drop cancelled requests from the engine, hand it the new ones, then one `PagedEngine.step`; every
request gets its new tokens once per step, and a last Update with its finish reason. A request is never lost: if
the engine fails, every request in flight gets an Update with the error.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from llama_jax.generation.paged_engine import Output, PagedEngine, Request, Token


class QueueFull(Exception):
    """`max_waiting` requests are already waiting for a place."""


@dataclasses.dataclass(frozen=True)
class Update:
    """New tokens of a request; finish_reason "stop" (a stop id), "length" (max_new_tokens) or "error" (then
    `error` says why) on its last Update, None before. cached: prompt tokens taken from the prefix cache (on the
    first Update)."""

    tokens: list[Token]
    finish_reason: str | None = None
    error: str | None = None
    cached: int = 0


class Ticket:
    """A submitted request. `cancel()` (any thread) frees its place in the queue at once, and its blocks at the
    scheduler's next loop."""

    def __init__(self, request: Request, emit: Callable[[Update], None], scheduler: Scheduler):
        self.request, self.emit, self.scheduler = request, emit, scheduler
        self.cancelled, self.started, self.sid = False, False, None

    def cancel(self) -> None:
        self.scheduler._cancel(self)


class Scheduler:
    def __init__(self, engine: PagedEngine, *, max_waiting: int):
        self.engine, self.max_waiting = engine, max_waiting
        self.inbox: list[Ticket] = []  # submitted, not yet handed to the engine
        self.tickets: dict[int, Ticket] = {}  # engine sid -> ticket, until its request ends
        self.closing, self.failed = False, None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="llama_jax-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, emit: Callable[[Update], None]) -> Ticket:
        """Queue a request (ValueError if it can never run, QueueFull if `max_waiting` wait already, RuntimeError
        once the scheduler is closing or has failed)."""
        self.engine.check(request)
        ticket = Ticket(request, emit, self)
        with self._wake:
            if self.closing or self.failed:
                raise RuntimeError(self.failed or "the server is shutting down")
            if self._waiting() >= self.max_waiting:
                raise QueueFull(f"{self._waiting()} requests are waiting for a place")
            self.inbox.append(ticket)
            self._wake.notify()
        return ticket

    def load(self) -> dict[str, int]:
        """Requests running and waiting, and the pool's blocks, for a health check."""
        with self._wake:
            load = self.engine.load()
            return load | {"busy": load["running"], "waiting": self._waiting()}

    def counters(self) -> dict[str, int]:
        """The engine's running totals (tokens prompted, generated and taken from the prefix cache, preemptions)."""
        return dict(self.engine.counters)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let those admitted or waiting finish, and end the thread."""
        with self._wake:
            self.closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _waiting(self) -> int:
        """Requests submitted and not cancelled that have not started (caller holds the lock)."""
        queued = sum(not t.started for t in self.tickets.values())
        return len(self.inbox) + queued

    def _cancel(self, ticket: Ticket) -> None:
        with self._wake:
            ticket.cancelled = True
            if ticket in self.inbox:
                self.inbox.remove(ticket)
            elif ticket.sid is not None:
                ticket.started = True  # no longer waiting: its place in the queue is free now
            self._wake.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self.inbox or self.tickets or self.closing):
                        self._wake.wait()
                    if self.closing and not (self.inbox or self.tickets):
                        return
                    new, self.inbox = self.inbox, []
                    cancelled = [sid for sid, t in self.tickets.items() if t.cancelled]
                for sid in cancelled:
                    self.engine.abort(sid)
                    with self._wake:
                        del self.tickets[sid]
                for ticket in new:
                    sid = self.engine.add(ticket.request)
                    with self._wake:
                        ticket.sid, self.tickets[sid] = sid, ticket
                if self.tickets:
                    for out in self.engine.step():
                        self._emit(out)
        except Exception as e:  # the device failed: no request may wait forever
            self._fail(f"{e.__class__.__name__}: {e}")

    def _emit(self, out: Output) -> None:
        """Send a request's new tokens, with its finish reason (and forget it) when it has finished."""
        with self._wake:
            ticket = self.tickets[out.sid]
            ticket.started = True
            if out.finish_reason is not None:
                del self.tickets[out.sid]
        if ticket.cancelled:
            return
        try:
            ticket.emit(Update(out.tokens, out.finish_reason, cached=out.cached))
        except Exception:  # a client's callback must not stop the others
            ticket.cancel()

    def _fail(self, message: str) -> None:
        with self._wake:
            self.failed = message
            tickets = list(self.tickets.values()) + self.inbox
            self.tickets.clear()
            self.inbox.clear()
        for ticket in tickets:
            try:
                ticket.emit(Update([], "error", message))
            except Exception:
                pass
        for sid in list(self.engine.running) + [s.sid for s in self.engine.waiting]:
            self.engine.abort(sid)
