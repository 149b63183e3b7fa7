"""Per-channel rate limit: at most N requests in ANY window of a minute, retries and digests included.

A token bucket of size N lets 2N through in some 60-second window (a full bucket, then a refill); a
DingTalk robot answers the 21st message of any minute with 130101 and then refuses everything for ten
minutes. So this is a sliding-window log instead, and a request holds its place in the log from the
moment it is reserved until a window after it *finished*: the server saw it somewhere in between, so
however long a round trip took, no window of the server's holds more than N of them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from router.channels.base import RateLimit

WINDOW_SECONDS = 60.0
# For clock-rate differences and a request arriving just after we gave up waiting for its answer.
MARGIN_SECONDS = 1.0


class Slot:
    """One request's place in the log; ``finished`` is set when its answer (or failure) came back."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished: float | None = None


class WindowLimiter:
    """At most ``per_minute`` requests in any window of a minute (plus the margin) and, with ``burst``,
    at most ``burst`` in any ``burst / per_minute`` of one."""

    def __init__(
        self, rate: RateLimit, *, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._slots: deque[Slot] = deque()  # in reservation order
        self._changed = asyncio.Event()
        self._rules: list[tuple[int, float]] = []
        self.configure(rate)

    def configure(self, rate: RateLimit) -> None:
        """New limits (hot reload); the log of recent requests is kept."""
        window = WINDOW_SECONDS + MARGIN_SECONDS
        self._rules = [(rate.per_minute, window)]
        if rate.burst is not None and rate.burst < rate.per_minute:
            self._rules.append((rate.burst, window * rate.burst / rate.per_minute))
        self._horizon = window
        self._changed.set()

    def _delay(self, now: float) -> float | None:
        """0 when a request may go now, else the seconds until one may; None: not before a request in
        flight finishes."""
        slots = self._slots
        while slots and slots[0].finished is not None and slots[0].finished + self._horizon <= now:
            slots.popleft()
        delay = 0.0
        for limit, window in self._rules:
            busy = [s.finished for s in slots if s.finished is None or s.finished + window > now]
            excess = len(busy) - limit + 1
            if excess <= 0:
                continue
            ends = sorted(f + window for f in busy if f is not None)
            if len(ends) < excess:
                return None
            delay = max(delay, ends[excess - 1] - now)
        return delay

    def try_acquire(self) -> Slot | None:
        """A slot if a request may go right now."""
        if self._delay(self._clock()) != 0:
            return None
        slot = Slot()
        self._slots.append(slot)
        return slot

    async def acquire(self) -> Slot:
        """Wait for a slot."""
        while (slot := self.try_acquire()) is None:
            delay = self._delay(self._clock())
            self._changed.clear()
            waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._changed.wait())]
            if delay is not None:
                waits.append(asyncio.ensure_future(self._sleep(delay)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return slot

    def release(self, slot: Slot) -> None:
        """The request finished (whatever the outcome): its slot frees a window from now."""
        slot.finished = self._clock()
        self._changed.set()

    def cancel(self, slot: Slot) -> None:
        """No request was made after all."""
        if slot in self._slots:  # a reload may have replaced the limiter in between
            self._slots.remove(slot)
            self._changed.set()
