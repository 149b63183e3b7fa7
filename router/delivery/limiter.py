"""Per-channel rate limit: at most N requests in ANY window of a minute, retries and digests included.

A token bucket of size N lets 2N through in some 60-second window (a full bucket, then a refill); a
DingTalk robot answers the 21st message of any minute with 130101 and then refuses everything for ten
minutes. So this is a sliding-window log instead, and a request holds its place in the log from the
moment it is reserved until a window after it *finished*: the server saw it somewhere in between, so
however long a round trip took, no window of the server's holds more than N of them.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right, insort
from collections.abc import Awaitable, Callable

from router.channels.base import RateLimit

WINDOW_SECONDS = 60.0
# For clock-rate differences and a request arriving just after we gave up waiting for its answer.
MARGIN_SECONDS = 1.0
MIN_WAIT_SECONDS = 0.001


class Slot:
    """One request's place in the log, reserved from the limiter that handed it out."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: WindowLimiter) -> None:
        self._limiter: WindowLimiter | None = limiter

    def release(self) -> None:
        """The request finished (whatever the outcome): its place frees a window from now."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._finished_one(sent=True)

    def cancel(self) -> None:
        """No request was made after all: the place frees at once."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._finished_one(sent=False)


class WindowLimiter:
    """At most ``per_minute`` requests in any window of a minute (plus the margin) and, with ``burst``,
    at most ``burst`` in any ``burst / per_minute`` of one."""

    def __init__(
        self, rate: RateLimit, *, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._in_flight = 0
        self._finished: list[float] = []  # finish times, ascending: the clock never goes back
        self._start = 0  # entries before it are older than any window
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
        finished = self._finished
        start = bisect_right(finished, now - self._horizon, lo=self._start)
        if start > 1024 and start * 2 > len(finished):  # drop the expired now and then, not every time
            del finished[:start]
            start = 0
        self._start = start
        delay = 0.0
        for limit, window in self._rules:
            first = bisect_right(finished, now - window, lo=start)  # the oldest still inside this window
            excess = self._in_flight + len(finished) - first - limit + 1
            if excess <= 0:
                continue
            if excess > len(finished) - first:
                return None
            delay = max(delay, finished[first + excess - 1] + window - now)
        return delay

    def try_acquire(self) -> Slot | None:
        """A slot if a request may go right now."""
        if self._delay(self._clock()) != 0:
            return None
        self._in_flight += 1
        return Slot(self)

    async def acquire(self) -> Slot:
        """Wait for a slot."""
        while (slot := self.try_acquire()) is None:
            delay = self._delay(self._clock())
            self._changed.clear()
            waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._changed.wait())]
            if delay is not None:
                # A floor, so that float rounding cannot wake us a hair early again and again.
                waits.append(asyncio.ensure_future(self._sleep(max(delay, MIN_WAIT_SECONDS))))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return slot

    def _finished_one(self, *, sent: bool) -> None:
        self._in_flight -= 1
        if sent:
            insort(self._finished, self._clock(), lo=self._start)  # a restored log may hold later times
        self._changed.set()

    def snapshot(self, *, wall_now: float, pending_seconds: float) -> list[float]:
        """The log in epoch seconds, for another process to resume from: requests still in flight count
        as finishing ``pending_seconds`` from now (their answer may come that late)."""
        now = self._clock()
        recent = [wall_now - (now - t) for t in self._finished[self._start :] if t > now - self._horizon]
        return recent + [wall_now + pending_seconds] * self._in_flight

    def restore(self, finished: list[float], *, wall_now: float) -> None:
        """Take over another owner's log (epoch seconds, from ``snapshot``)."""
        now = self._clock()
        self._finished = sorted(now - (wall_now - t) for t in finished if t > wall_now - self._horizon)
        self._start = 0
        self._changed.set()
