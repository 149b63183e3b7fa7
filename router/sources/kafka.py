"""Where events come in from Kafka: one consumer group's loop, shared by the routing stage (source topics)
and the notify stage (the notifications topic) — fetch, hand the stage each fetched batch (routing: one
call per partition's batch) or each record (notify: each settles on its own, maybe much later), commit the
settled prefix, at least once — plus producing with retries, reading a topic, and the dead-letter topic.

A record's offset is committed only once the stage settles it; per partition the commit point is the
lowest offset still unsettled, so records finishing out of order never skip one. Commits go out in
batches (time or count). Unsettled records are bounded per partition and overall: past the bound,
fetching pauses (Kafka keeps the backlog, not our memory).

Dead letters keep the source record's key, value and headers and add why and where from;
router.sources.replay routes them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import RecordMetadata

from router.metrics import Metrics

log = logging.getLogger(__name__)

DLQ_PREFIX = "imm-dlq-"
MAX_BACKOFF = 30.0
PAUSED_POLL_MS = 10


def dead_letter_headers(
    original: Iterable[tuple[str, bytes]], reason: str, topic: str, partition: int, offset: int, **extra: str | None
) -> list[tuple[str, bytes]]:
    """The original headers (earlier dead-letter headers dropped) plus why and where from."""
    headers = [(k, v) for k, v in original if not k.startswith(DLQ_PREFIX)]
    facts = {
        "reason": reason[:2000],
        "topic": topic,
        "partition": str(partition),
        "offset": str(offset),
        "time": str(int(time.time() * 1000)),
        **extra,
    }
    headers += [(DLQ_PREFIX + k, v.encode()) for k, v in facts.items() if v is not None]
    return headers


# (partition, record, settle): the stage calls ``settle()`` once the record is done with, maybe later.
Handler = Callable[[TopicPartition, Any, Callable[[], None]], Awaitable[None]]
# (settle): handles one record, as Handler does, for ConsumerStage.take.
Handle = Callable[[Callable[[], None]], Awaitable[None]]
# (partition, records of one fetch, in offset order): every record is settled once the call returns.
BatchHandler = Callable[[TopicPartition, list[Any]], Awaitable[None]]
RevokeHook = Callable[[set[TopicPartition]], Awaitable[None]]
AssignHook = Callable[[set[TopicPartition]], Awaitable[None]]


@dataclass
class PartitionTracker:
    """Offsets of one partition in consumption order; the commit point advances over settled ones."""

    order: deque[int] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)
    next_commit: int | None = None
    committed: int | None = None
    busy: int = 0  # handler calls still running (a settled record's may still be finishing)
    expected: int | None = None  # the offset after the last one started
    taken: set[int] = field(default_factory=set)  # started by ConsumerStage.take, not fetched yet

    def start(self, offset: int) -> None:
        self.order.append(offset)
        self.expected = offset + 1

    def arrived(self, records: list[Any]) -> list[Any]:
        """Start fetched ``records``; those to handle now (the rest were taken before they came)."""
        if not self.taken:
            for record in records:
                self.start(record.offset)
            return records
        fresh = []
        for record in records:
            if record.offset in self.taken:
                self.taken.discard(record.offset)
            else:
                self.start(record.offset)
                fresh.append(record)
        return fresh

    def settle(self, offset: int) -> None:
        self.settled.add(offset)
        while self.order and self.order[0] in self.settled:
            done = self.order.popleft()
            self.settled.discard(done)
            self.next_commit = done + 1

    @property
    def in_flight(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class Bounds:
    max_in_flight: int
    max_in_flight_per_partition: int
    commit_interval_seconds: float
    commit_every_records: int
    revoke_timeout_seconds: float


class ConsumerStage:
    def __init__(
        self,
        name: str,
        consumer: AIOKafkaConsumer,
        bounds: Bounds,
        metrics: Metrics,
        handler: Handler | None = None,
        *,
        batch_handler: BatchHandler | None = None,
        on_assigned: AssignHook | None = None,
        on_revoked: RevokeHook | None = None,
        on_paused: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.bounds = bounds
        self.metrics = metrics
        assert (handler is None) != (batch_handler is None), "one handler: per record or per fetched batch"
        self.handler = handler
        self.batch_handler = batch_handler
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.on_paused = on_paused  # told when ``paused`` changes
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.peak_in_flight = 0
        self.paused = False
        self._progress = asyncio.Event()
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    @property
    def committed(self) -> int:
        """Committed offsets summed over the owned partitions: records settled for good."""
        return sum(t.committed or 0 for t in self.trackers.values())

    @property
    def settled(self) -> int:
        """Records settled over the owned partitions, committed or due in the next commit."""
        return sum(t.next_commit or 0 for t in self.trackers.values())

    @property
    def in_flight(self) -> int:
        return sum(t.in_flight for t in self.trackers.values())

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self._backpressure()
            # Never take more than the room left, so the bound holds even within one batch.
            room = max(1, min(self.bounds.max_in_flight - self.in_flight, self.bounds.max_in_flight_per_partition))
            try:
                # aiokafka's getmany wakes only for fetched records, and a paused partition is not fetched:
                # while paused, poll briefly, so a batch that settles makes room at once, not at the timeout.
                timeout_ms = PAUSED_POLL_MS if self.paused else 200
                batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=room)
            except KafkaError as exc:
                log.warning("%s: fetch failed (%s); retrying", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)
                continue
            for tp, records in batch.items():
                tracker = self.trackers.setdefault(tp, PartitionTracker())
                fresh = tracker.arrived(records)
                if self.batch_handler is not None:
                    if fresh:
                        self._spawn(self._process_batch(tp, tracker, fresh))
                else:
                    for record in fresh:
                        self._spawn(self._process(tp, tracker, record.offset, self._handle(tp, record)))
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._backpressure()
            await self._maybe_commit()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _process_batch(self, tp: TopicPartition, tracker: PartitionTracker, records: list[Any]) -> None:
        assert self.batch_handler is not None
        tracker.busy += 1
        try:
            await self.batch_handler(tp, records)
            for record in records:
                tracker.settle(record.offset)
            self._since_commit += len(records)
        finally:
            tracker.busy -= 1
            self._progress.set()

    def take(self, tp: TopicPartition, offset: int, handle: Handle) -> bool:
        """Handle the record at ``offset`` of ``tp`` now, before it is fetched: one this process has just
        written to a partition this stage consumes, so it need not wait for it to come back. Only if every
        record before it has come already (records are still handled in offset order) and there is room;
        False otherwise, and it is handled when fetched. A taken record is skipped when fetched."""
        tracker = self.trackers.get(tp)
        if tracker is None or tracker.expected != offset or self.in_flight >= self.bounds.max_in_flight:
            return False
        tracker.start(offset)
        tracker.taken.add(offset)
        self._spawn(self._process(tp, tracker, offset, handle))
        return True

    def _handle(self, tp: TopicPartition, record: Any) -> Handle:
        assert self.handler is not None
        handler = self.handler
        return lambda settle: handler(tp, record, settle)

    async def _process(self, tp: TopicPartition, tracker: PartitionTracker, offset: int, handle: Handle) -> None:
        done = False

        def settle() -> None:
            nonlocal done
            if not done:
                done = True
                tracker.settle(offset)
                self._since_commit += 1
                self._progress.set()

        tracker.busy += 1
        try:
            await handle(settle)
        finally:
            tracker.busy -= 1
            self._progress.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait (bounded) until ``condition`` holds; it is checked whenever a record progresses."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            self._progress.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    # --- flow control and commits ---------------------------------------------------------------

    def _backpressure(self) -> None:
        assigned = self.consumer.assignment()
        total = self.in_flight
        full = {
            tp
            for tp in assigned
            if total >= self.bounds.max_in_flight
            or self.trackers.get(tp, PartitionTracker()).in_flight >= self.bounds.max_in_flight_per_partition
        }
        paused = self.consumer.paused()
        if full - paused:
            self.consumer.pause(*(full - paused))
        if paused - full:
            self.consumer.resume(*(paused - full))
        if self.paused != bool(full):
            self.paused = bool(full)
            self.on_paused()

    async def _maybe_commit(self) -> None:
        due = time.monotonic() - self._last_commit >= self.bounds.commit_interval_seconds
        if due or self._since_commit >= self.bounds.commit_every_records:
            await self.commit()

    async def commit(self, *, force: bool = False, only: Iterable[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        wanted = set(only) if only is not None else set(self.trackers)
        # The trackers are held here, not looked up again: a rebalance during the await may drop them.
        due = {
            tp: (t, t.next_commit)
            for tp, t in self.trackers.items()
            if tp in wanted and t.next_commit is not None and t.next_commit != t.committed
        }
        if not due:
            return
        offsets = {tp: offset for tp, (_, offset) in due.items()}
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=10.0 if not force else 5.0)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("%s: offset commit failed (%s); will retry", self.name, type(exc).__name__)
            return
        for tp, (tracker, offset) in due.items():
            tracker.committed = offset
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - offset))
        self._since_commit = 0
        self.metrics.commits.inc()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for the handler calls in progress."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, timeout))

    def cancel(self) -> None:
        for task in set(self.tasks):
            task.cancel()  # not settled, so not committed: read again after the restart

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the stage drop the revoked partitions' waiting work, finish what is running (bounded), and
        commit what is settled."""
        if self.on_revoked is not None:
            # Every revoked partition, fetched from or not: the stage may hold state for one it never read.
            await self.on_revoked(revoked)
        revoked = {tp for tp in revoked if tp in self.trackers}
        if not revoked:
            return
        await self.wait_until(
            lambda: all(self.trackers[tp].busy == 0 for tp in revoked), self.bounds.revoke_timeout_seconds
        )
        await self.commit(only=revoked)
        for tp in revoked:
            self.trackers.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: ConsumerStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.stage.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("%s: assigned %s", self.stage.name, ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)))
        if self.stage.on_assigned is not None:
            await self.stage.on_assigned(set(assigned))


class DeadLetters:
    """The dead-letter topic: every record produced there carries why and where from (``dead_letter_headers``)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, metrics: Metrics) -> None:
        self.producer = producer
        self.topic = topic
        self.metrics = metrics

    async def record(self, record: Any, reason: str, **extra: str | None) -> None:
        """Dead-letter a consumed record."""
        await self.produce(
            record.key, record.value, record.headers or (), reason, record.topic, record.partition, record.offset, extra
        )

    async def produce(
        self,
        key: bytes | None,
        value: bytes | None,
        original: Iterable[tuple[str, bytes]],
        reason: str,
        topic: str,
        partition: int,
        offset: int,
        extra: Mapping[str, str | None],
    ) -> None:
        """Produce to the dead-letter topic; retried until it succeeds (never lost, never skipped). A record
        that no longer fits once the reason is added (records over the size limit are what gets dead-lettered)
        goes without its value, and a header that says so and where the original is."""
        headers = dead_letter_headers(original, reason, topic, partition, offset, **extra)
        if key is None and value is None:
            value = b""  # other clients may write a record with neither; aiokafka cannot (the reason says empty)
        try:
            await produce(self.producer, self.topic, key=key, value=value, headers=headers)
        except MessageSizeTooLargeError:
            size = len(value or b"")
            dropped = f"{size} bytes, over the producer's size limit with the reason added; the original is at "
            dropped += f"{topic}/{partition}@{offset} until the topic's retention ends"
            headers.append((DLQ_PREFIX + "value-dropped", dropped.encode()))
            log.warning("dead-lettering %s/%s@%s without its value: %s", topic, partition, offset, dropped)
            # Empty, not null: a record needs a key or a value (aiokafka refuses one with neither).
            await produce(self.producer, self.topic, key=key, value=b"" if key is None else None, headers=headers)
        self.metrics.dead_letter_records.labels(reason.split(":", 1)[0]).inc()
        if extra.get("channel"):
            self.metrics.dead_lettered.labels(extra["channel"]).inc()


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> RecordMetadata:
    """Produce and wait for the broker; retried with backoff until it succeeds (never lost, never skipped).
    Raises MessageSizeTooLargeError for a record over the size limit: no retry can send it."""
    backoff = 0.5
    while True:
        try:
            return await producer.send_and_wait(topic, value=value, key=key, headers=headers, partition=partition)
        except MessageSizeTooLargeError:
            raise
        except KafkaError as exc:
            log.warning("produce to %s failed (%s); retrying in %.1fs", topic, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


async def produce_all(
    producer: AIOKafkaProducer, messages: Iterable[tuple[str, bytes | None, bytes | None]]
) -> list[RecordMetadata | MessageSizeTooLargeError]:
    """Produce many records and wait for the broker once: they batch together, in order per partition.
    Any that fails is produced again by ``produce`` (with its retries) until it succeeds. Per message: where
    it was written, or the error of one over the size limit (never sent: the caller decides what becomes
    of it)."""
    messages = list(messages)
    queued: list[asyncio.Future[Any] | None] = []
    for topic, key, value in messages:
        try:
            queued.append(await producer.send(topic, value=value, key=key))
        except KafkaError:  # e.g. no metadata yet for the topic: left to produce's retries below
            queued.append(None)
    results: list[RecordMetadata | MessageSizeTooLargeError] = []
    for (topic, key, value), future in zip(messages, queued, strict=True):
        try:
            if future is not None:
                try:
                    # All are in flight already: waiting in order costs no more than at once.
                    results.append(await future)
                    continue
                except KafkaError:
                    pass
            results.append(await produce(producer, topic, key=key, value=value))
        except MessageSizeTooLargeError as exc:
            results.append(exc)
    return results


def where(record: Any) -> str:
    return f"{record.topic}/{record.partition}@{record.offset}"


async def quietly(awaitable: Awaitable[Any], timeout: float = 10.0) -> None:
    """Stop a client without letting a hung broker connection hang shutdown. aiokafka's consumer ``stop()``
    raises CancelledError when the broker is gone (it cancels its own fetch task, asleep in a retry): only
    a cancellation of the caller itself goes on."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        pass


async def read_topic(options: dict[str, Any], topic: str) -> list[Any]:
    """Every record of ``topic`` up to its current end (no consumer group, nothing committed)."""
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **options)
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while any(position < ends[tp] for tp, position in [(tp, await consumer.position(tp)) for tp in tps]):
            for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                # All that came, not only those below the end: a broker may report the end of a
                # partition as one past the *first* record of its last batch (Tansu does, until the next
                # produce), and the rest of that batch arrives in the same fetch.
                records.extend(batch)
        return records
    finally:
        await quietly(consumer.stop())
