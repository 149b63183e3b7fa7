"""The delivery stages every channel shares: dedup, rate limit turning overflow into digests, concurrency,
per-attempt timeout, retry with backoff and jitter, and a circuit breaker.

A channel makes one attempt and says whether another could help (DeliveryError.retriable); trying
again, holding back and giving up happen here, the same way for every channel. ``Delivery.deliver``
returns once a notification is settled and raises DeliveryFailed when it is given up.

Metrics, by channel: sent (delivered, alone or inside a digest), digested (of those, inside a digest),
digests_sent, failed (failed attempts; a digest counts once), retried, duplicates, latency (record time to
delivered) and circuit_open. What is given up (DeliveryFailed) is counted as dead-lettered by whoever
dead-letters it (the service), once per notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.channels import make_channel, scrubber
from router.channels.base import Channel, ChannelConfigBase, PooledChannel, Scrubber
from router.delivery.breaker import Breaker
from router.delivery.dedup import DedupMemory
from router.delivery.limiter import LimiterPool, Slot
from router.engine import Engine
from router.errors import DeliveryError, RenderError, RouterError
from router.metrics import Metrics
from router.notification import Notification

log = logging.getLogger(__name__)

SEVERITY_ORDER = ("info", "warning", "critical")


def _rank(severity: str) -> int:
    return SEVERITY_ORDER.index(severity) if severity in SEVERITY_ORDER else 0


class DeliveryFailed(RouterError):
    """A notification was given up: a permanent error, its attempts or time budget spent, its channel's
    circuit open, or ``reason == "shutdown"`` when the router stopped before it settled."""

    def __init__(self, notification: Notification, reason: str, attempts: int) -> None:
        self.notification = notification
        self.reason = reason
        self.attempts = attempts
        n = notification
        super().__init__(
            f"{n.channel}: gave up on event {n.event_id} (rule {n.rule}) after {attempts} attempt(s): {reason}"
        )


class _CircuitOpen(Exception):
    """Refused without trying: the channel's circuit is open."""

    def __init__(self, lane: _Lane) -> None:
        self.reason = f"circuit open after {lane.breaker.failures} failed attempts in a row; last: {lane.last_error}"


@dataclass(eq=False)
class _Job:
    notification: Notification
    record_time: float | None
    attempts: int = 0
    held: asyncio.Future[str] | None = None  # while it waits in a digest buffer


@dataclass(eq=False)
class _Endpoint:
    """A channel object and the attempts using it: replaced on reload, closed once idle."""

    channel: Channel
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Lane:
    """Everything Delivery keeps for one channel name."""

    name: str
    config: ChannelConfigBase
    endpoint: _Endpoint
    breaker: Breaker
    scrub: Scrubber
    semaphore: asyncio.Semaphore
    limiter: LimiterPool | None = None  # a window per member of the channel's pool (one outside a pool)
    buffer: deque[_Job] = field(default_factory=deque)  # held back by the rate limit, for a digest
    flusher: asyncio.Task[None] | None = None
    last_error: str = ""
    # This channel's children of the metrics every delivery updates (a label lookup each, otherwise).
    sent: Any = None
    latency: Any = None


class Delivery:
    """Delivers notifications through their channels. Owns the channels: ``close`` closes them.

    ``clock`` and ``sleep`` (monotonic seconds) drive the rate limits, backoff, breaker and dedup TTL;
    tests pass a virtual pair so no real minute has to pass."""

    def __init__(
        self,
        engine: Engine,
        channels: Mapping[str, Channel],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        before_send: Callable[[str, list[list[float]]], Awaitable[None]] | None = None,
    ) -> None:
        self.metrics = metrics
        # Called with a rate-limited channel's logs (epoch seconds, one per pool member) before each of its
        # sends: the owner of the channel persists them, so that the next owner never exceeds the limit,
        # even after a crash.
        self._before_send = before_send
        self._clock = clock
        self._sleep = sleep
        self._engine = engine
        service = engine.settings.service
        self._dedup = DedupMemory(service.dedup_ttl_seconds, service.dedup_max_entries, clock=clock)
        self._lanes: dict[str, _Lane] = {}
        self._unused = [ch for name, ch in channels.items() if name not in engine.settings.channels]
        for name, config in engine.settings.channels.items():
            given = channels.get(name)
            channel = given if given is not None else make_channel(name, config, kafka_defaults=engine.settings.kafka)
            self._lanes[name] = self._new_lane(name, config, channel)
        self._inflight: dict[tuple[str, str, str], asyncio.Future[None]] = {}
        self._callers: set[asyncio.Task[Any]] = set()  # tasks inside deliver()
        self._drained = asyncio.Event()
        self._drained.set()
        self._shut_down: set[asyncio.Task[Any]] = set()  # cancelled by close()
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def channels(self) -> dict[str, Channel]:
        """The channel objects in use now (a reload may replace some)."""
        return {name: lane.endpoint.channel for name, lane in self._lanes.items()}

    # --- configuration ---------------------------------------------------------------------------

    def _new_lane(self, name: str, config: ChannelConfigBase, channel: Channel) -> _Lane:
        semaphore = asyncio.Semaphore(config.concurrency)
        lane = _Lane(name, config, _Endpoint(channel), Breaker(clock=self._clock), Scrubber(()), semaphore)
        lane.sent, lane.latency = self.metrics.sent.labels(name), self.metrics.latency.labels(name)
        self._configure(lane, config)
        return lane

    def _configure(self, lane: _Lane, config: ChannelConfigBase) -> None:
        if config.concurrency != lane.config.concurrency:
            lane.semaphore = asyncio.Semaphore(config.concurrency)
        lane.config = config
        lane.scrub = scrubber(config, kafka_defaults=self._engine.settings.kafka)
        rate = config.effective_rate_limit()
        if rate is None:
            lane.limiter = None
        elif lane.limiter is None:
            lane.limiter = LimiterPool(rate, config.pool_size(), clock=self._clock, sleep=self._sleep)
        else:
            lane.limiter.configure(rate, config.pool_size())  # keep the logs: a reload must not reset the windows

    def channels_for(self, engine: Engine) -> dict[str, Channel]:
        """The channel objects a swap to ``engine`` needs (new channels, and those whose config changed).
        Building them is the last step of a reload that can fail (ConfigError); nothing is swapped yet."""
        settings = engine.settings
        kafka_changed = settings.kafka != self._engine.settings.kafka
        return {
            name: make_channel(name, config, kafka_defaults=settings.kafka)
            for name, config in settings.channels.items()
            if name not in self._lanes or kafka_changed or config != self._lanes[name].config
        }

    def swap_engine(self, engine: Engine, fresh: Mapping[str, Channel] | None = None) -> None:
        """Hot reload: new templates and rules apply to what is delivered from now on (digests still held
        are rendered with the new digest templates); a channel whose config changed gets its new channel
        object from ``fresh`` (``channels_for(engine)``), the old one is closed once its attempts in flight
        are done; a removed channel's held notifications fail. Nothing here can fail half-way."""
        fresh = self.channels_for(engine) if fresh is None else fresh
        self._engine = engine
        settings = engine.settings
        self._dedup.configure(settings.service.dedup_ttl_seconds, settings.service.dedup_max_entries)
        for name, config in settings.channels.items():
            lane = self._lanes.get(name)
            if lane is None:
                self._lanes[name] = self._new_lane(name, config, fresh[name])
                continue
            if name in fresh:
                self._retire(lane.endpoint)
                lane.endpoint = _Endpoint(fresh[name])
            self._configure(lane, config)
        for name in set(self._lanes) - set(settings.channels):
            lane = self._lanes.pop(name)
            self._retire(lane.endpoint)
            held, lane.buffer = list(lane.buffer), deque()
            self._fail(held, "channel removed from the config")

    def _retire(self, endpoint: _Endpoint) -> None:
        task = asyncio.create_task(self._close_when_idle(endpoint))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_idle(self, endpoint: _Endpoint) -> None:
        while endpoint.users:
            endpoint.idle.clear()
            await endpoint.idle.wait()
        await self._close_channel(endpoint.channel)

    def restore_limiter(self, channel: str, logs: list[list[float]]) -> None:
        """Resume a channel's rate-limit logs from its previous owner (epoch seconds, one per pool member)."""
        lane = self._lanes.get(channel)
        if lane is not None and lane.limiter is not None:
            lane.limiter.restore(logs, wall_now=time.time())

    # --- delivering ------------------------------------------------------------------------------

    async def deliver(self, notification: Notification, *, record_time: float | None = None) -> str:
        """Settle one notification: "sent", "digested" (delivered inside a digest) or "duplicate".
        Raises DeliveryFailed when it is given up. ``record_time`` (epoch seconds) feeds the latency."""
        key = notification.dedup_key
        while True:
            if self._closing:
                raise DeliveryFailed(notification, "shutdown", 0)
            if self._dedup.seen(key):
                self.metrics.duplicates.labels(notification.channel).inc()
                return "duplicate"
            other = self._inflight.get(key)
            if other is None:
                break
            # The same notification is being delivered (a redelivered record): its outcome decides.
            await asyncio.shield(other)
        me = asyncio.current_task()
        assert me is not None, "deliver() runs in a task"
        done = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        job = _Job(notification, record_time)
        self._callers.add(me)
        self._drained.clear()
        try:
            return await self._settle(job)
        except asyncio.CancelledError:
            # close() ran out of time and cancelled us (like asyncio.timeout, undone if it was only that).
            if me in self._shut_down and me.uncancel() == 0:
                raise DeliveryFailed(notification, "shutdown", job.attempts) from None
            raise
        finally:
            self._callers.discard(me)
            self._shut_down.discard(me)
            if not self._callers:
                self._drained.set()
            del self._inflight[key]
            done.set_result(None)

    async def _settle(self, job: _Job) -> str:
        n = job.notification
        lane = self._lanes.get(n.channel)
        if lane is None:
            raise self._given_up(job, f"channel {n.channel!r} is not in the config")
        started = self._clock()
        while True:
            slot: Slot | None = None
            if lane.limiter is not None and (lane.buffer or (slot := lane.limiter.try_acquire()) is None):
                # Over the budget, or a digest already waits (fresh alerts must not starve it): join it.
                return await self._hold(lane, job)
            try:
                await self._attempt(lane, n, slot, [job])
            except _CircuitOpen as refused:
                raise self._given_up(job, refused.reason) from None
            except DeliveryError as err:
                delay = self._retry_delay(lane, err, job.attempts, started)
                if delay is None:
                    raise self._given_up(job, str(err)) from None
                self.metrics.retried.labels(lane.name).inc()
                log.debug("%s: retrying event %s in %.1fs: %s", lane.name, n.event_id, delay, err)
                await self._sleep(delay)
                if self._lanes.get(lane.name) is not lane:
                    raise self._given_up(job, "channel removed from the config") from None
                continue
            self._delivered(lane, [job])
            return "sent"

    async def _attempt(self, lane: _Lane, notification: Notification, slot: Slot | None, jobs: list[_Job]) -> None:
        """One attempt at sending; raises DeliveryError (scrubbed) if it failed, _CircuitOpen without trying."""
        endpoint = lane.endpoint
        endpoint.users += 1
        semaphore = lane.semaphore  # a reload may replace it meanwhile: release the one acquired
        try:
            try:
                await semaphore.acquire()
            except BaseException:
                if slot is not None:
                    slot.cancel()  # cancelled while queued: nothing was sent
                raise
            try:
                # Checked once a send may start: those queued behind a failing round fail fast too.
                if not lane.breaker.allow(lane.config.circuit_breaker):
                    if slot is not None:
                        slot.cancel()
                    raise _CircuitOpen(lane)
                for job in jobs:
                    job.attempts += 1
                if slot is not None and lane.limiter is not None and self._before_send is not None:
                    log_now = lane.limiter.snapshot(wall_now=time.time(), pending_seconds=lane.config.timeout_seconds)
                    await self._before_send(lane.name, log_now)
                try:
                    async with asyncio.timeout(lane.config.timeout_seconds):
                        channel = endpoint.channel
                        if slot is not None and isinstance(channel, PooledChannel):
                            await channel.send_via(slot.member, notification)  # the member whose window has room
                        else:
                            await channel.send(notification)
                except DeliveryError:
                    raise
                except TimeoutError:
                    raise DeliveryError(
                        f"no answer within {lane.config.timeout_seconds:g}s", retriable=True, channel=lane.name
                    ) from None
                except Exception as exc:  # a channel's bug must not escape as anything but a failed attempt
                    text = lane.scrub(f"{type(exc).__name__}: {exc}")
                    raise DeliveryError(text, retriable=True, channel=lane.name) from None
                finally:
                    if slot is not None:
                        slot.release()
            finally:
                semaphore.release()
        except DeliveryError as err:
            self.metrics.failed.labels(lane.name).inc()
            lane.last_error = str(err)
            self._record(lane, ok=not err.retriable)
            raise
        else:
            self._record(lane, ok=True)
        finally:
            endpoint.users -= 1
            if not endpoint.users:
                endpoint.idle.set()

    def _record(self, lane: _Lane, *, ok: bool) -> None:
        was_open = lane.breaker.is_open
        lane.breaker.record(ok, lane.config.circuit_breaker)
        if lane.breaker.is_open != was_open:
            self.metrics.circuit_open.labels(lane.name).set(int(lane.breaker.is_open))
            if was_open:
                log.info("%s: circuit closed, the channel answers again", lane.name)
            else:
                log.warning("%s: circuit open, failing fast: %s", lane.name, lane.last_error)

    def _retry_delay(self, lane: _Lane, err: DeliveryError, attempts: int, started: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        policy = lane.config.retry
        if not err.retriable or attempts >= policy.attempts:
            return None
        backoff: float = min(policy.max_backoff_seconds, policy.initial_backoff_seconds * 2 ** (attempts - 1))
        delay = backoff * random.uniform(0.5, 1.0)  # jitter: a burst of failures does not retry in step
        if self._clock() + delay - started > policy.budget_seconds:
            return None
        return delay

    def _delivered(self, lane: _Lane, jobs: list[_Job]) -> None:
        now = time.time()
        for job in jobs:
            lane.sent.inc()
            if job.record_time is not None:
                lane.latency.observe(max(0.0, now - job.record_time))
            self._dedup.mark(job.notification.dedup_key)

    def _given_up(self, job: _Job, reason: str) -> DeliveryFailed:
        failed = DeliveryFailed(job.notification, reason, job.attempts)
        log.warning("%s", failed)
        return failed

    def _fail(self, jobs: list[_Job], reason: str) -> None:
        for job in jobs:
            if job.held is not None and not job.held.done():
                job.held.set_exception(self._given_up(job, reason))

    # --- digests ---------------------------------------------------------------------------------

    async def _hold(self, lane: _Lane, job: _Job) -> str:
        """Wait in the lane's digest buffer until a message carrying this notification is delivered."""
        job.held = asyncio.get_running_loop().create_future()
        lane.buffer.append(job)
        if lane.flusher is None or lane.flusher.done():
            lane.flusher = asyncio.create_task(self._flush(lane))
        try:
            return await job.held
        finally:
            if not job.held.done():  # cancelled (shutdown): it must not show up in a later digest
                job.held.cancel()
                if job in lane.buffer:
                    lane.buffer.remove(job)

    async def _flush(self, lane: _Lane) -> None:
        """Send the buffer as digests, each as soon as the rate limit allows one more message."""
        jobs: list[_Job] = []
        try:
            while lane.buffer:
                if lane.breaker.refusing:
                    jobs, lane.buffer = list(lane.buffer), deque()
                    self._fail(jobs, _CircuitOpen(lane).reason)
                    return
                slot = await lane.limiter.acquire() if lane.limiter is not None else None
                batch = self._take_batch(lane)
                if batch is None:
                    if slot is not None:
                        slot.cancel()
                    continue
                jobs, message = batch
                await self._send_batch(lane, jobs, message, slot)
        except Exception as exc:  # a bug here must not leave held notifications waiting for ever
            jobs, lane.buffer = [*jobs, *lane.buffer], deque()
            self._fail(jobs, lane.scrub(f"digest: {type(exc).__name__}: {exc}"))

    def _take_batch(self, lane: _Lane) -> tuple[list[_Job], Notification] | None:
        """The next message from the buffer: up to digest_max_alerts alerts, fewer if the channel would
        have to cut the digest's text (every alert must be visible in some message); one alert alone
        goes as its own message."""
        while lane.buffer and lane.buffer[0].held is not None and lane.buffer[0].held.done():
            lane.buffer.popleft()
        if not lane.buffer:
            return None
        count = min(lane.config.digest_max_alerts, len(lane.buffer))
        message = lane.buffer[0].notification
        while count > 1:
            jobs = [lane.buffer[i] for i in range(count)]
            try:
                message = self._digest(lane, [job.notification for job in jobs])
            except RenderError as exc:
                for _ in range(count):
                    lane.buffer.popleft()
                self._fail(jobs, f"digest template: {exc}")
                return None
            if not lane.config.truncated(message.payload):
                break
            count //= 2
        if count == 1:
            message = lane.buffer[0].notification
        return [lane.buffer.popleft() for _ in range(count)], message

    def _digest(self, lane: _Lane, alerts: list[Notification]) -> Notification:
        payload = self._engine.render_digest(lane.name, alerts)
        severity = max((n.severity for n in alerts), key=_rank)
        return Notification(
            event_id=f"digest:{alerts[0].event_id}+{len(alerts) - 1}",
            event_type="imm-router:digest",
            rule="digest",
            channel=lane.name,
            template=lane.config.digest_template or lane.config.default_digest_template,
            severity=severity,
            payload=payload,
            summary=f"digest of {len(alerts)} alerts",
        )

    async def _send_batch(self, lane: _Lane, jobs: list[_Job], message: Notification, slot: Slot | None) -> None:
        started = self._clock()
        tries = 0
        while True:
            tries += 1
            try:
                await self._attempt(lane, message, slot, jobs)
            except _CircuitOpen as refused:
                self._fail(jobs, refused.reason)
                return
            except DeliveryError as err:
                delay = self._retry_delay(lane, err, tries, started)
                if delay is None:
                    self._fail(jobs, str(err))
                    return
                self.metrics.retried.labels(lane.name).inc()
                await self._sleep(delay)
                slot = await lane.limiter.acquire() if lane.limiter is not None else None
                continue
            self._delivered(lane, jobs)
            digest = len(jobs) > 1
            if digest:
                self.metrics.digests_sent.labels(lane.name).inc()
                self.metrics.digested.labels(lane.name).inc(len(jobs))
            for job in jobs:
                if job.held is not None and not job.held.done():
                    job.held.set_result("digested" if digest else "sent")
            return

    # --- shutdown --------------------------------------------------------------------------------

    async def close(self, deadline: float) -> None:
        """Let pending deliveries and digests finish for up to ``deadline`` seconds; whatever is still
        pending then fails with DeliveryFailed("shutdown"). Then close every channel."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), deadline)
        flushers = [lane.flusher for lane in self._lanes.values() if lane.flusher is not None]
        for task in flushers:
            task.cancel()
        for task in self._callers:
            self._shut_down.add(task)
            task.cancel()
        await asyncio.gather(*flushers, return_exceptions=True)
        await self._drained.wait()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        channels = [lane.endpoint.channel for lane in self._lanes.values()] + self._unused
        await asyncio.gather(*(self._close_channel(channel) for channel in channels))

    async def _close_channel(self, channel: Channel) -> None:
        try:
            await channel.close()
        except Exception as exc:  # closing is best effort; the others still get closed
            log.warning("%s: closing the channel failed: %s", channel.name, type(exc).__name__)
