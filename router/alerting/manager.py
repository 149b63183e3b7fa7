"""The owner of a channel: what happens to a notification between its handoff and its channel.

Each partition of ``kafka.notifications_topic`` has one owner at a time (the consumer group decides), and
all of a channel's notifications share a partition, so the owner alone keeps that channel's state:
duplicate memory, throttles, groups and the rate-limit log. Every change to it is written to the
partition's twin in ``kafka.changelog_topic`` before it counts; the next owner reads the twin back
before taking over. Alerts waiting in a group or throttle are not in the changelog: their handoff
records stay uncommitted until their message is delivered, so the next owner reads them again.

For each notification, in order: duplicate → silenced → inhibited → muted (time intervals) → throttled
→ grouped → sent. Silences, inhibitions and time intervals are judged again when a group or throttle
summary is sent, so an alert waiting in ``group_wait`` is muted by a silence added meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from router import jsoncodec
from router.alerting.handoff import Handoff
from router.alerting.inhibit import InhibitionLog
from router.alerting.timing import active
from router.delivery.dedup import DedupMemory
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.engine import Engine, group_facts, group_template, rule_doc
from router.errors import RenderError
from router.metrics import Metrics
from router.notification import Notification
from router.rules import Notify

log = logging.getLogger(__name__)

# After a takeover, wait this long before sending a restored group, so that its alerts read again from
# the notifications topic go out in one message rather than two.
TAKEOVER_SETTLE_SECONDS = 1.0

Reason = Literal["silenced", "inhibited", "muted", "throttled", "duplicate"]


class Silences(Protocol):
    def __len__(self) -> int: ...  # silences known, active or not: with none, no alert's root need be read

    def silenced_by(self, root: dict[str, Any], rule: str, channel: str, now: datetime) -> Any: ...


class ChangelogWriter(Protocol):
    async def put(self, partition: int, key: str, value: dict[str, Any] | None) -> None: ...


# Dead-letters the source record of a given-up alert: (handoff, reason, attempts).
DeadLetter = Callable[[Handoff, str, int], Awaitable[None]]


def suppression(
    engine: Engine,
    handoff: Handoff,
    target: Notify | None,
    now: float,
    silences: Silences | None,
    inhibitions: InhibitionLog,
) -> tuple[Reason, str] | None:
    """Why this alert must not be sent at ``now`` (silenced, inhibited or muted), or None."""
    n = handoff.notification
    if silences:
        silence = silences.silenced_by(handoff.root, n.rule, n.channel, datetime.fromtimestamp(now, UTC))
        if silence is not None:
            return "silenced", f"silence {silence.id} ({silence.match}) by {silence.author}: {silence.comment}"
    why = inhibitions.inhibited_by(
        engine.settings.inhibit_rules,
        n.rule,
        lambda exprs: engine.values(exprs, handoff.root),
        handoff.seen,
        now,
    )
    if why is not None:
        return "inhibited", why
    if target is not None and (target.mute_time_intervals or target.active_time_intervals):
        moment = datetime.fromtimestamp(now, UTC)
        muted = active(target.mute_time_intervals, engine.intervals, moment)
        if muted is not None:
            return "muted", f"inside mute time interval {muted}"
        if target.active_time_intervals and active(target.active_time_intervals, engine.intervals, moment) is None:
            return "muted", f"outside active time intervals {', '.join(target.active_time_intervals)}"
    return None


@dataclass(eq=False)
class Held:
    """An alert waiting in a group or throttle; ``settle`` lets its handoff offset be committed."""

    handoff: Handoff
    settle: Callable[[], None]


@dataclass(eq=False)
class Bucket:
    """A group (``group_by``) or a throttled key: alerts collected into one message at a time."""

    key: str
    kind: Literal["group", "throttle"]
    partition: int
    channel: str
    rule: str
    source_template: str  # the rule's template for this channel: names the notify target
    template: str  # the group template
    labels: dict[str, Any]
    first: float
    last_flush: float | None = None
    live_until: float = 0.0
    messages: int = 0
    pending: list[Held] = field(default_factory=list)
    flush_at: float | None = None
    flushing: bool = False
    timer: asyncio.TimerHandle | None = None

    def over(self, now: float) -> bool:
        """Nothing waits and its time is up: a throttle window ended, or a group outlived its
        group_interval after sending (the next alert starts it afresh, with group_wait)."""
        idle = not self.pending and not self.flushing and self.live_until <= now
        return idle and (self.kind == "throttle" or self.messages > 0)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "channel": self.channel,
            "rule": self.rule,
            "source_template": self.source_template,
            "template": self.template,
            "labels": self.labels,
            "first": self.first,
            "last_flush": self.last_flush,
            "live_until": self.live_until,
            "messages": self.messages,
        }

    @classmethod
    def from_state(cls, key: str, partition: int, doc: dict[str, Any]) -> Bucket:
        return cls(
            key=key,
            kind=doc["kind"],
            partition=partition,
            channel=str(doc["channel"]),
            rule=str(doc["rule"]),
            source_template=str(doc["source_template"]),
            template=str(doc["template"]),
            labels=dict(doc["labels"]),
            first=float(doc["first"]),
            last_flush=doc["last_flush"],
            live_until=float(doc["live_until"]),
            messages=int(doc["messages"]),
        )


@dataclass(eq=False)
class PartitionState:
    dedup: DedupMemory
    buckets: dict[str, Bucket] = field(default_factory=dict)
    resume_at: float = 0.0  # no restored group is sent before this


class Manager:
    def __init__(
        self,
        engine: Engine,
        delivery: Delivery,
        metrics: Metrics,
        *,
        changelog: ChangelogWriter,
        dead_letter: DeadLetter,
        silences: Silences | None = None,
        inhibitions: InhibitionLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.delivery = delivery
        self.metrics = metrics
        self.changelog = changelog
        self.dead_letter = dead_letter
        self.silences = silences
        self.inhibitions = inhibitions or InhibitionLog()
        self.clock = clock
        self.partitions: dict[int, PartitionState] = {}
        # Set once a partition's state is restored (or it is revoked): the consumer may hand records of a
        # partition over while its changelog is still being read.
        self._ready: dict[int, asyncio.Event] = {}
        self.channel_partition: dict[str, int] = {}
        self.flushes: set[asyncio.Task[None]] = set()

    def swap_engine(self, engine: Engine) -> None:
        self.engine = engine

    # --- ownership -----------------------------------------------------------------------------------

    def _new_state(self) -> PartitionState:
        service = self.engine.settings.service
        return PartitionState(DedupMemory(service.dedup_ttl_seconds, service.dedup_max_entries, clock=self.clock))

    def assign(self, partition: int, changelog: list[tuple[str, Any]]) -> None:
        """Take over ``partition``, resuming from its changelog (oldest first, the latest value wins)."""
        state = self._new_state()
        limiters: dict[str, list[list[float]]] = {}
        for key, value in changelog:
            kind, _, rest = key.partition("|")
            try:
                if kind == "d" and value is not None:
                    state.dedup.remember(tuple(orjson.loads(rest)), float(value["exp"]))
                elif kind == "b":
                    if value is None:
                        state.buckets.pop(rest, None)
                    else:
                        state.buckets[rest] = Bucket.from_state(rest, partition, value)
                elif kind == "l" and value is not None:
                    # One log per pool member: the first as "times" (as before pools), the others in "pool".
                    logs = [value["times"], *value.get("pool", [])]
                    limiters[rest] = [[float(t) for t in times] for times in logs]
            except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
                log.warning("changelog partition %d: skipping malformed entry %r: %s", partition, key[:200], exc)
        for channel, times in limiters.items():
            self.channel_partition[channel] = partition
            self.delivery.restore_limiter(channel, times)
        now = self.clock()
        state.buckets = {k: b for k, b in state.buckets.items() if b.live_until > now or b.messages == 0}
        log.debug(
            "partition %d restored: %d duplicates remembered, groups %s",
            partition,
            len(state.dedup),
            {k: (b.messages, round(b.live_until - now, 1)) for k, b in state.buckets.items()},
        )
        state.resume_at = now + TAKEOVER_SETTLE_SECONDS if state.buckets else 0.0
        self.partitions[partition] = state
        self._ready.setdefault(partition, asyncio.Event()).set()
        self._update_gauges()

    def revoke(self, partitions: set[int]) -> None:
        """Forget the state of partitions given to another owner; their waiting alerts stay unsettled."""
        for partition in partitions:
            ready = self._ready.pop(partition, None)
            if ready is not None:
                ready.set()  # waiting handoffs find no state and stay unsettled
            state = self.partitions.pop(partition, None)
            if state is None:
                continue
            for bucket in state.buckets.values():
                if bucket.timer is not None:
                    bucket.timer.cancel()
                bucket.pending.clear()
        self.channel_partition = {c: p for c, p in self.channel_partition.items() if p not in partitions}
        self._update_gauges()

    def flushes_of(self, partitions: set[int]) -> list[asyncio.Task[None]]:
        return [t for t in self.flushes if getattr(t, "partition", None) in partitions]

    async def persist_limiter(self, channel: str, logs: list[list[float]]) -> None:
        """Delivery's before-send hook: the channel's rate-limit logs go to its changelog partition."""
        partition = self.channel_partition.get(channel)
        if partition is not None:
            value: dict[str, Any] = {"times": logs[0]}
            if len(logs) > 1:
                value["pool"] = logs[1:]
            await self.changelog.put(partition, f"l|{channel}", value)

    # --- one alert -----------------------------------------------------------------------------------

    async def accept(self, partition: int, handoff: Handoff, settle: Callable[[], None]) -> None:
        """Take one handed-off notification. Returns once it is settled or waits in a group or throttle."""
        ready = self._ready.setdefault(partition, asyncio.Event())
        await ready.wait()
        state = self.partitions.get(partition)
        if state is None:
            return  # revoked meanwhile: the next owner reads it again
        n = handoff.notification
        self.channel_partition[n.channel] = partition
        now = self.clock()
        if state.dedup.seen(n.dedup_key):
            self._suppressed(n, "duplicate")
            settle()
            return
        target = self.engine.targets.get((n.rule, n.channel, n.template))
        why = suppression(self.engine, handoff, target, now, self.silences, self.inhibitions)
        if why is not None:
            self._suppressed(n, why[0])
            settle()
            return
        held = Held(handoff, settle)
        if target is not None and target.throttle is not None:
            values = self.engine.values(target.throttle.key, handoff.root)
            key = _bucket_key("t", n, values)
            bucket = state.buckets.get(key)
            if bucket is not None and bucket.live_until > now:
                self._suppressed(n, "throttled")
                bucket.pending.append(held)
                self._schedule(bucket, state)
                return
            # The first alert for the key goes on; the key is held from now on.
            bucket = self._open(state, key, "throttle", partition, n, target, target.throttle.key, values, now)
            bucket.live_until = now + target.throttle.for_
            await self._persist(bucket)
            self._schedule(bucket, state)
        if target is not None and target.group_by is not None:
            values = self.engine.values(target.group_by, handoff.root)
            key = _bucket_key("g", n, values)
            bucket = state.buckets.get(key)
            if bucket is None or bucket.over(now):
                bucket = self._open(state, key, "group", partition, n, target, target.group_by, values, now)
                bucket.pending.append(held)
                await self._persist(bucket)
            else:
                bucket.pending.append(held)
            self._schedule(bucket, state)
            return
        await self._send([held], n, partition)

    def _open(
        self,
        state: PartitionState,
        key: str,
        kind: Literal["group", "throttle"],
        partition: int,
        n: Notification,
        target: Notify,
        exprs: tuple[str, ...],
        values: tuple[Any, ...],
        now: float,
    ) -> Bucket:
        old = state.buckets.get(key)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        template = group_template(self.engine.settings.channels[n.channel], target)
        labels = {e: v for e, v in zip(exprs, values, strict=True)}
        bucket = Bucket(key, kind, partition, n.channel, n.rule, n.template, template, labels, first=now)
        state.buckets[key] = bucket
        self._update_gauges()
        return bucket

    def _due(self, bucket: Bucket, state: PartitionState) -> float | None:
        """When the bucket must act next: send what waits, or be dropped once idle."""
        target = self._target_of(bucket)
        if bucket.flushing:
            return None
        if bucket.pending:
            if bucket.kind == "throttle":
                due = bucket.live_until
            elif bucket.messages == 0:
                due = bucket.first + (target.group_wait if target else 0.0)
            else:
                interval = target.group_interval if target else 0.0
                due = (bucket.last_flush or bucket.first) + interval
            return max(due, state.resume_at)
        return bucket.live_until

    def _target_of(self, bucket: Bucket) -> Notify | None:
        return self.engine.targets.get((bucket.rule, bucket.channel, bucket.source_template))

    def _schedule(self, bucket: Bucket, state: PartitionState) -> None:
        due = self._due(bucket, state)
        if due is None or (bucket.timer is not None and bucket.flush_at == due):
            return
        if bucket.timer is not None:
            bucket.timer.cancel()
        bucket.flush_at = due
        loop = asyncio.get_running_loop()
        bucket.timer = loop.call_later(max(0.0, due - self.clock()), self._fire, bucket)

    def _fire(self, bucket: Bucket) -> None:
        bucket.timer = None
        state = self.partitions.get(bucket.partition)
        if state is None or state.buckets.get(bucket.key) is not bucket or bucket.flushing:
            return  # gone, or a flush is running (it schedules what comes next when it ends)
        if not bucket.pending:
            if bucket.over(self.clock()):
                del state.buckets[bucket.key]
                self._update_gauges()
                self._spawn(self.changelog.put(bucket.partition, f"b|{bucket.key}", None), bucket.partition)
            elif bucket.live_until > self.clock():
                self._schedule(bucket, state)
            return
        # Marked here, not when the task starts: alerts arriving meanwhile must not schedule another flush.
        bucket.flushing = True
        self._spawn(self._flush(bucket, state), bucket.partition)

    def _spawn(self, work: Awaitable[None], partition: int) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the timer chain silently
                log.exception("alert manager: background work failed")

        task = asyncio.create_task(run())
        task.partition = partition  # type: ignore[attr-defined]
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def _flush(self, bucket: Bucket, state: PartitionState) -> None:
        try:
            held, bucket.pending = bucket.pending, []
            now = self.clock()
            sending = []
            target = self._target_of(bucket)
            for item in held:
                why = suppression(self.engine, item.handoff, target, now, self.silences, self.inhibitions)
                if why is not None:
                    self._suppressed(item.handoff.notification, why[0])
                    item.settle()
                else:
                    sending.append(item)
            log.debug("flushing %s: %d alerts (%d suppressed)", bucket.key, len(sending), len(held) - len(sending))
            if sending:
                try:
                    await self._send_group(bucket, sending)
                except Exception as exc:  # e.g. its channel removed by a reload: never leave alerts stuck
                    log.exception("%s: sending a %s message failed", bucket.channel, bucket.kind)
                    reason = f"internal error: {type(exc).__name__}: {exc}"
                    await asyncio.gather(*(self._give_up(h, reason, 0) for h in sending))
            if self.partitions.get(bucket.partition) is not state:
                return  # revoked while sending
            bucket.messages += 1
            bucket.last_flush = self.clock()
            target = self._target_of(bucket)
            if bucket.kind == "throttle":
                bucket.live_until = bucket.last_flush + (target.throttle.for_ if target and target.throttle else 0.0)
            else:
                bucket.live_until = bucket.last_flush + (target.group_interval if target else 0.0)
            await self._persist(bucket)
        finally:
            bucket.flushing = False
        if self.partitions.get(bucket.partition) is state:
            self._schedule(bucket, state)

    async def _send_group(self, bucket: Bucket, held: list[Held]) -> None:
        """One message for the alerts, or several if one would have to be cut (every alert must show)."""
        first = min(h.handoff.seen for h in held)
        last = max(h.handoff.seen for h in held)
        chunk = len(held)
        channel = self.engine.settings.channels[bucket.channel]
        while True:
            chunks = [held[i : i + chunk] for i in range(0, len(held), chunk)]
            try:
                messages = [
                    self._group_message(bucket, part, i, len(chunks), first, last) for i, part in enumerate(chunks)
                ]
            except RenderError as exc:
                await asyncio.gather(*(self._give_up(h, f"group template: {exc}", 0) for h in held))
                return
            if chunk == 1 or not any(channel.truncated(m.payload) for m in messages):
                break
            chunk = (chunk + 1) // 2
        await asyncio.gather(*(self._send(part, m, bucket.partition) for part, m in zip(chunks, messages, strict=True)))

    def _group_message(
        self, bucket: Bucket, held: list[Held], part: int, parts: int, first: float, last: float
    ) -> Notification:
        alerts = [h.handoff.notification for h in held]
        facts = group_facts(
            bucket.kind,
            bucket.labels,
            self.engine.rule_docs.get(bucket.rule) or rule_doc(None, bucket.rule),
            datetime.fromtimestamp(first, UTC).isoformat(),
            datetime.fromtimestamp(last, UTC).isoformat(),
            part + 1,
            parts,
            bucket.messages + 1,
        )
        payload = self.engine.render_group(bucket.channel, bucket.template, alerts, facts)
        # The id says what the message carries, not only its number: after a takeover the number can repeat
        # (the state write after a send can be lost to a revocation), and delivery's duplicate memory must
        # not take a message with other alerts for one already sent.
        carried = hashlib.blake2b(digest_size=8)
        for alert in alerts:
            carried.update(jsoncodec.dumps(alert.dedup_key))
        return Notification(
            event_id=f"{bucket.kind}:{bucket.key}:{bucket.messages + 1}:{part + 1}:{carried.hexdigest()}",
            event_type=f"imm-router:{bucket.kind}",
            rule=bucket.rule,
            channel=bucket.channel,
            template=bucket.template,
            severity=alerts[0].severity,
            payload=payload,
            summary=f"{bucket.kind} of {len(alerts)} alerts ({bucket.rule})",
        )

    async def _send(self, held: list[Held], message: Notification, partition: int) -> None:
        """Deliver one message carrying ``held``; then remember and settle them (or dead-letter them)."""
        record_time = min((h.handoff.record_time for h in held if h.handoff.record_time is not None), default=None)
        try:
            await self.delivery.deliver(message, record_time=record_time)
        except DeliveryFailed as exc:
            if exc.reason == "shutdown":
                return  # unsettled: read again after the restart
            await asyncio.gather(*(self._give_up(h, exc.reason, exc.attempts) for h in held))
            return
        if len(held) > 1 or message.event_type != held[0].handoff.notification.event_type:
            self.metrics.group_messages.labels(message.channel).inc()
        state = self.partitions.get(partition)
        if state is not None:
            writes = []
            for h in held:
                key = h.handoff.notification.dedup_key
                state.dedup.mark(key)
                expiry = state.dedup.expiry(key)
                if expiry is not None:
                    writes.append(self.changelog.put(partition, "d|" + orjson.dumps(key).decode(), {"exp": expiry}))
            await asyncio.gather(*writes)
        for h in held:
            h.settle()

    async def _give_up(self, held: Held, reason: str, attempts: int) -> None:
        await self.dead_letter(held.handoff, reason, attempts)
        held.settle()

    async def _persist(self, bucket: Bucket) -> None:
        await self.changelog.put(bucket.partition, f"b|{bucket.key}", bucket.state())

    # --- visibility ----------------------------------------------------------------------------------

    def _suppressed(self, n: Notification, reason: Reason) -> None:
        self.metrics.suppressed.labels(n.channel, reason).inc()

    def _update_gauges(self) -> None:
        self.metrics.groups_open.set(
            sum(1 for s in self.partitions.values() for b in s.buckets.values() if b.kind == "group")
        )

    async def close(self, timeout: float) -> None:
        """Let sends in progress finish (bounded); waiting alerts stay unsettled for the next owner."""
        for state in self.partitions.values():
            for bucket in state.buckets.values():
                if bucket.timer is not None:
                    bucket.timer.cancel()
        if self.flushes:
            await asyncio.wait(set(self.flushes), timeout=timeout)
        for task in set(self.flushes):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.flushes, return_exceptions=True)


def _bucket_key(kind: str, n: Notification, values: tuple[Any, ...]) -> str:
    labels = jsoncodec.dumps([n.rule, n.channel, n.template, values], option=orjson.OPT_NON_STR_KEYS)
    return f"{kind}|{labels.decode()}"
