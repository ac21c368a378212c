"""Continuous batching: a thread that feeds waiting requests into a SlotEngine's free slots and steps it.

    scheduler = Scheduler(engine, max_waiting=64)
    scheduler.start()
    ticket = scheduler.submit(request, emit)   # emit(Update) is called from the scheduler's thread
    ticket.cancel()                            # the client went away: its slot is freed before the next step
    scheduler.close()                          # lets every admitted and waiting request finish, then stops

Each loop: free the slots of cancelled requests, admit waiting requests into free slots (first in, first out),
then one `SlotEngine.step`; every request gets its new tokens once per step, and a last Update with its finish
reason. A request is never lost: if the engine fails, every request in flight gets an Update with the error.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

from llama_jax.generation.slots import Request, SlotEngine, Token


class QueueFull(Exception):
    """Every slot is busy and `max_waiting` requests are already waiting."""


@dataclasses.dataclass(frozen=True)
class Update:
    """New tokens of a request; finish_reason "stop" (a stop id), "length" (max_new_tokens) or "error" (then
    `error` says why) on its last Update, None before."""

    tokens: list[Token]
    finish_reason: str | None = None
    error: str | None = None


class Ticket:
    """A submitted request. `cancel()` (any thread) frees its slot at the scheduler's next loop."""

    def __init__(self, request: Request, emit: Callable[[Update], None]):
        self.request, self.emit, self.cancelled = request, emit, False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, engine: SlotEngine, *, max_waiting: int):
        self.engine, self.max_waiting = engine, max_waiting
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: dict[int, Ticket] = {}  # slot -> ticket
        self.closing, self.failed = False, None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="llama_jax-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, emit: Callable[[Update], None]) -> Ticket:
        """Queue a request (ValueError if it can never run, QueueFull if there is no room, RuntimeError once the
        scheduler is closing or has failed)."""
        self.engine.check(request)
        ticket = Ticket(request, emit)
        with self._wake:
            if self.closing or self.failed:
                raise RuntimeError(self.failed or "the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for a slot")
            self.waiting.append(ticket)
            self._wake.notify()
        return ticket

    def load(self) -> dict[str, int]:
        """Slots busy and requests waiting, for a health check."""
        with self._wake:
            return {"slots": self.engine.slots, "busy": len(self.running), "waiting": len(self.waiting)}

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let those admitted or waiting finish, and end the thread."""
        with self._wake:
            self.closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self.waiting or self.running or self.closing):
                        self._wake.wait()
                    if self.closing and not (self.waiting or self.running):
                        return
                self._release_cancelled()
                self._admit()
                if self.running:
                    for slot, tokens in enumerate(self.engine.step()):
                        if tokens and slot in self.running:
                            self._finish_or_emit(slot, tokens)
        except Exception as e:  # the device failed: no request may wait forever
            self._fail(f"{e.__class__.__name__}: {e}")

    def _release_cancelled(self) -> None:
        for slot, ticket in list(self.running.items()):
            if ticket.cancelled:
                self._free(slot)

    def _admit(self) -> None:
        for slot in self.engine.free_slots():
            with self._wake:
                ticket = self.waiting.popleft() if self.waiting else None
            while ticket is not None and ticket.cancelled:
                with self._wake:
                    ticket = self.waiting.popleft() if self.waiting else None
            if ticket is None:
                return
            first = self.engine.admit(slot, ticket.request)
            with self._wake:
                self.running[slot] = ticket
            self._finish_or_emit(slot, [first])

    def _finish_or_emit(self, slot: int, tokens: list[Token]) -> None:
        """Send a row's new tokens, with its finish reason (and free it) when it has finished."""
        reason = self.engine.finish_reasons().get(slot)
        ticket = self.running[slot]
        if reason is not None:
            self._free(slot)
        try:
            ticket.emit(Update(tokens, reason))
        except Exception:  # a client's callback must not stop the others
            ticket.cancel()

    def _free(self, slot: int) -> None:
        self.engine.release(slot)
        with self._wake:
            self.running.pop(slot, None)

    def _fail(self, message: str) -> None:
        with self._wake:
            self.failed = message
            tickets = list(self.running.values()) + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for ticket in tickets:
            try:
                ticket.emit(Update([], "error", message))
            except Exception:
                pass
        self.engine.busy[:] = False
