"""Per-channel rate limit: at most N requests in ANY window of a minute, retries and digests included.

A token bucket of size N lets 2N through in some 60-second window (a full bucket, then a refill); a
DingTalk robot answers the 21st message of any minute with 130101 and then refuses everything for ten
minutes. So this is a sliding-window log instead, and a request holds its place in the log from the
moment it is reserved until a window after it *finished*: the server saw it somewhere in between, so
however long a round trip took, no window of the server's holds more than N of them.

A pool (several DingTalk robots of one group behind one channel) has a window per member: a request
goes to the member with the most room, and waits only when every member is full.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right, insort
from collections.abc import Awaitable, Callable, Sequence

from router.channels.base import RateLimit

WINDOW_SECONDS = 60.0
# For clock-rate differences and a request arriving just after we gave up waiting for its answer.
MARGIN_SECONDS = 1.0
MIN_WAIT_SECONDS = 0.001


class Slot:
    """One request's place in the log, reserved from the limiter that handed it out. ``member``: which
    member of a pool the request must go to (0 outside a pool)."""

    __slots__ = ("_limiter", "member")

    def __init__(self, limiter: WindowLimiter) -> None:
        self._limiter: WindowLimiter | None = limiter
        self.member = limiter.member

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
        self,
        rate: RateLimit,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        member: int = 0,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.member = member
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

    def used(self) -> int:
        """Requests in flight or inside the window now."""
        now = self._clock()
        return self._in_flight + len(self._finished) - bisect_right(self._finished, now - self._horizon, lo=self._start)

    async def acquire(self) -> Slot:
        """Wait for a slot."""
        return await _first_slot([self], self.try_acquire)

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


async def _first_slot(limiters: Sequence[WindowLimiter], try_acquire: Callable[[], Slot | None]) -> Slot:
    """Wait until ``try_acquire`` gives a slot: woken when any of ``limiters`` changes or when the soonest
    of their windows opens."""
    while (slot := try_acquire()) is None:
        delays = [d for d in (limiter._delay(limiter._clock()) for limiter in limiters) if d is not None]
        for limiter in limiters:
            limiter._changed.clear()
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(lim._changed.wait()) for lim in limiters]
        if delays:
            # A floor, so that float rounding cannot wake us a hair early again and again.
            waits.append(asyncio.ensure_future(limiters[0]._sleep(max(min(delays), MIN_WAIT_SECONDS))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
    return slot


class LimiterPool:
    """A window per member of a pool, each at ``rate``: a request takes a place with the member that has
    the most room, so the load spreads and no member goes over its own limit."""

    def __init__(
        self, rate: RateLimit, size: int, *, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.members: list[WindowLimiter] = []
        self.configure(rate, size)

    def configure(self, rate: RateLimit, size: int) -> None:
        """New limits or pool size (hot reload); the logs of the members that stay are kept."""
        del self.members[size:]
        for member in self.members:
            member.configure(rate)
        while len(self.members) < size:
            self.members.append(WindowLimiter(rate, clock=self._clock, sleep=self._sleep, member=len(self.members)))

    def try_acquire(self) -> Slot | None:
        """A slot with the least used member that may send right now, if any."""
        for member in sorted(self.members, key=WindowLimiter.used):
            slot = member.try_acquire()
            if slot is not None:
                return slot
        return None

    async def acquire(self) -> Slot:
        """Wait for a slot with any member."""
        return await _first_slot(self.members, self.try_acquire)

    def snapshot(self, *, wall_now: float, pending_seconds: float) -> list[list[float]]:
        """Each member's log (see WindowLimiter.snapshot), in member order."""
        return [m.snapshot(wall_now=wall_now, pending_seconds=pending_seconds) for m in self.members]

    def restore(self, logs: Sequence[list[float]], *, wall_now: float) -> None:
        """Take over another owner's logs (from ``snapshot``); members beyond them start empty."""
        for member, finished in zip(self.members, logs, strict=False):
            member.restore(finished, wall_now=wall_now)
