"""The service: consume IMM events from Kafka, route, deliver, commit — at least once.

A record's offset is committed only when every notification it produced is settled: delivered
(alone or inside a digest), suppressed as a duplicate, or dead-lettered. Per partition the commit
point is the lowest offset still in flight, so records finishing out of order never skip one.
Commits go out in batches (time or count). Work in flight is bounded per partition and overall:
past the bound, fetching pauses (Kafka keeps the backlog, not our memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from router.channels import make_channel
from router.decode import decode, iter_events
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.engine import Engine, load
from router.errors import ConfigError, DecodeError
from router.metrics import Metrics
from router.notification import Notification
from router.ops import OpsServer, Watcher, secret_values, setup_logging

log = logging.getLogger(__name__)

DLQ_PREFIX = "imm-dlq-"
MAX_BACKOFF = 30.0


@dataclass
class PartitionTracker:
    """Offsets of one partition in consumption order; the commit point advances over settled ones."""

    order: deque[int] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)
    next_commit: int | None = None
    committed: int | None = None

    def start(self, offset: int) -> None:
        self.order.append(offset)

    def settle(self, offset: int) -> None:
        self.settled.add(offset)
        while self.order and self.order[0] in self.settled:
            done = self.order.popleft()
            self.settled.discard(done)
            self.next_commit = done + 1

    @property
    def in_flight(self) -> int:
        return len(self.order)


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


class Service:
    def __init__(self, engine: Engine, config_path: Path | None = None, metrics: Metrics | None = None) -> None:
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.engine = self._instrumented(engine)
        self.stopping = asyncio.Event()
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.settled = asyncio.Condition()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.delivery: Delivery | None = None
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self.peak_in_flight = 0
        self.channel_health: dict[str, str] = {}
        self.on_reload: list[Callable[[Engine], None]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.engine.settings
        channels = {
            name: make_channel(name, config, kafka_defaults=settings.kafka)
            for name, config in settings.channels.items()
        }
        self.delivery = Delivery(self.engine, channels, self.metrics)
        health = asyncio.create_task(self.watch_channels())
        try:
            if await self._connect():
                await self._consume()
        finally:
            health.cancel()
            await self._shutdown()

    def stop(self) -> None:
        self.stopping.set()

    @property
    def committed(self) -> int:
        """Committed offsets summed over the owned partitions: records settled for good."""
        return sum(t.committed or 0 for t in self.trackers.values())

    async def _connect(self) -> bool:
        """Start the consumer and the dead-letter producer, retrying with backoff until stopped."""
        kafka = self.engine.settings.kafka
        backoff = 1.0
        while not self.stopping.is_set():
            options = kafka.client_options()
            consumer = AIOKafkaConsumer(
                group_id=kafka.group_id,
                enable_auto_commit=False,
                auto_offset_reset=kafka.auto_offset_reset,
                session_timeout_ms=kafka.session_timeout_ms,
                heartbeat_interval_ms=kafka.heartbeat_interval_ms,
                fetch_max_wait_ms=kafka.fetch_max_wait_ms,
                **options,
            )
            producer = AIOKafkaProducer(acks="all", **options)
            try:
                await producer.start()
                consumer.subscribe(list(kafka.topics), listener=_Rebalance(self))
                await consumer.start()
            except KafkaError as exc:
                await _quietly(consumer.stop())
                await _quietly(producer.stop())
                log.warning(
                    "Kafka at %s unreachable (%s); retrying in %.0fs",
                    kafka.bootstrap_servers,
                    type(exc).__name__,
                    backoff,
                )
                await self._wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.consumer, self.producer = consumer, producer
            log.info(
                "consuming %s from %s as group %s", ",".join(kafka.topics), kafka.bootstrap_servers, kafka.group_id
            )
            return True
        return False

    async def _consume(self) -> None:
        assert self.consumer is not None
        service = self.engine.settings.service
        while not self.stopping.is_set():
            self._backpressure()
            # Never take more than the room left, so the bound holds even within one batch.
            room = max(1, min(service.max_in_flight - len(self.tasks), service.max_in_flight_per_partition))
            try:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=room)
            except KafkaError as exc:
                log.warning("fetch failed (%s); retrying", exc)
                await self._wait(1.0)
                continue
            for tp, records in batch.items():
                tracker = self.trackers.setdefault(tp, PartitionTracker())
                for record in records:
                    tracker.start(record.offset)
                    task = asyncio.create_task(self._process(tp, tracker, record))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            self.peak_in_flight = max(self.peak_in_flight, len(self.tasks))
            self._backpressure()
            await self._maybe_commit()

    async def _shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the drain deadline, commit, close."""
        drain = self.engine.settings.service.drain_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        if self.tasks:
            log.info("draining %d records in flight (deadline %.0fs)", len(self.tasks), drain)
            await asyncio.wait(set(self.tasks), timeout=max(0.0, drain * 0.8))
        if self.delivery is not None:
            await self.delivery.close(max(0.5, deadline - loop.time()))
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=max(0.1, deadline - loop.time()))
        for task in set(self.tasks):
            task.cancel()  # not settled, so not committed: redelivered after the restart
        if self.consumer is not None:
            await self._commit(force=True)
            await _quietly(self.consumer.stop(), timeout=5.0)
        if self.producer is not None:
            await _quietly(self.producer.stop(), timeout=5.0)
        log.info("stopped")

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # --- one record -----------------------------------------------------------------------------

    async def _process(self, tp: TopicPartition, tracker: PartitionTracker, record: Any) -> None:
        self.metrics.in_flight.inc()
        try:
            await self._route(tp, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the record: dead-letter it with the reason
            log.exception("unexpected error routing %s/%d@%d", tp.topic, tp.partition, record.offset)
            await self._dead_letter(tp, record, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.in_flight.dec()
        tracker.settle(record.offset)
        self._since_commit += 1
        async with self.settled:
            self.settled.notify_all()

    async def _route(self, tp: TopicPartition, record: Any) -> None:
        engine = self.engine  # a reload swaps self.engine; this record keeps the one it started with
        source = f"{tp.topic}/{tp.partition}@{record.offset}"
        try:
            event = decode(record.value, record.headers or (), limits=engine.limits, source=source)
        except DecodeError as exc:
            self.metrics.decode_failures.inc()
            log.warning("dead-lettering undecodable record: %s", exc)
            await self._dead_letter(tp, record, f"decode: {exc.reason}")
            return
        self.metrics.records.labels(str(event.wire_format)).inc()
        result = engine.route(event)
        for rule in {n.rule for n in result.notifications}:
            self.metrics.rule_matches.labels(rule).inc()
        for failure in result.failures:
            self.metrics.render_failures.labels(failure.channel).inc()
            await self._dead_letter(
                tp, record, f"render: {failure.reason}", rule=failure.rule, channel=failure.channel, event_id=event.id
            )
        if result.notifications:
            await asyncio.gather(*(self._deliver(tp, record, n) for n in result.notifications))

    async def _deliver(self, tp: TopicPartition, record: Any, notification: Notification) -> None:
        assert self.delivery is not None
        try:
            await self.delivery.deliver(notification, record_time=record.timestamp / 1000)
        except DeliveryFailed as exc:
            if self.stopping.is_set() and exc.reason == "shutdown":
                raise asyncio.CancelledError from exc  # unsettled: redelivered after the restart
            await self._dead_letter(
                tp,
                record,
                f"delivery: {exc.reason}",
                rule=notification.rule,
                channel=notification.channel,
                event_id=notification.event_id,
                attempts=str(exc.attempts),
            )

    async def _dead_letter(self, tp: TopicPartition, record: Any, reason: str, **extra: str | None) -> None:
        """Produce the record to the dead-letter topic; retried until it succeeds (never lost, never skipped)."""
        assert self.producer is not None
        kafka = self.engine.settings.kafka
        headers = dead_letter_headers(record.headers or (), reason, tp.topic, tp.partition, record.offset, **extra)
        backoff = 0.5
        while True:
            try:
                await self.producer.send_and_wait(
                    kafka.dead_letter_topic, value=record.value, key=record.key, headers=headers
                )
                break
            except KafkaError as exc:
                log.warning("dead-letter produce failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self.metrics.dead_letter_records.labels(reason.split(":", 1)[0]).inc()
        if extra.get("channel"):
            self.metrics.dead_lettered.labels(extra["channel"]).inc()

    # --- flow control and commits ---------------------------------------------------------------

    def _backpressure(self) -> None:
        assert self.consumer is not None
        service = self.engine.settings.service
        assigned = self.consumer.assignment()
        total = sum(t.in_flight for t in self.trackers.values())
        full = {
            tp
            for tp in assigned
            if total >= service.max_in_flight
            or self.trackers.get(tp, PartitionTracker()).in_flight >= service.max_in_flight_per_partition
        }
        paused = self.consumer.paused()
        if full - paused:
            self.consumer.pause(*(full - paused))
        if paused - full:
            self.consumer.resume(*(paused - full))
        self.metrics.paused.set(1 if full else 0)

    async def _maybe_commit(self) -> None:
        service = self.engine.settings.service
        due = time.monotonic() - self._last_commit >= service.commit_interval_seconds
        if due or self._since_commit >= service.commit_every_records:
            await self._commit()

    async def _commit(self, *, force: bool = False, only: Iterable[TopicPartition] | None = None) -> None:
        assert self.consumer is not None
        self._last_commit = time.monotonic()
        wanted = set(only) if only is not None else set(self.trackers)
        offsets = {
            tp: t.next_commit
            for tp, t in self.trackers.items()
            if tp in wanted and t.next_commit is not None and t.next_commit != t.committed
        }
        if not offsets:
            return
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=10.0 if not force else 5.0)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("offset commit failed (%s); will retry", type(exc).__name__)
            return
        for tp, offset in offsets.items():
            self.trackers[tp].committed = offset
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - offset))
        self._since_commit = 0
        self.metrics.commits.inc()

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Finish (or, past a bound, abandon) the revoked partitions' work and commit what is settled."""
        revoked = [tp for tp in revoked if tp in self.trackers]
        if not revoked:
            return
        bound = min(10.0, self.engine.settings.service.drain_timeout_seconds)
        async with self.settled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.settled.wait_for(lambda: all(self.trackers[tp].in_flight == 0 for tp in revoked)), bound
                )
        await self._commit(only=revoked)
        for tp in revoked:
            self.trackers.pop(tp, None)

    # --- readiness -----------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Ready when the config is loaded, the broker answers and we are not draining. Unhealthy
        channels are reported but do not make the router unready: its other channels still work."""
        broker = "not connected"
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.client.fetch_all_metadata(), 2.0)
                broker = "ok"
            except (KafkaError, TimeoutError, OSError) as exc:
                broker = f"unreachable: {type(exc).__name__}"
        degraded = {name: state for name, state in self.channel_health.items() if state != "ok"}
        ready = broker == "ok" and not self.stopping.is_set()
        return {
            "ready": ready,
            "config": "ok",
            "broker": broker,
            "draining": self.stopping.is_set(),
            "rules": len(self.engine.rules.rules),
            "channels": self.channel_health,
            "degraded": degraded,
        }

    async def watch_channels(self) -> None:
        """Check every channel's health now and then, for /readyz."""
        interval = self.engine.settings.service.health_interval_seconds
        while not self.stopping.is_set():
            # Delivery owns the channels: a reload replaces the ones whose config changed.
            channels = self.delivery.channels if self.delivery is not None else {}
            for name, channel in list(channels.items()):
                try:
                    await asyncio.wait_for(channel.health(), 10.0)
                    self.channel_health[name] = "ok"
                except Exception as exc:  # report any failure as the channel's state, never crash
                    self.channel_health[name] = f"unhealthy: {exc}"[:300]
            await self._wait(interval)

    def _instrumented(self, engine: Engine) -> Engine:
        engine.rules.on_error = lambda rule: self.metrics.rule_errors.labels(rule.name).inc()
        return engine

    # --- hot reload -----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load and validate the config again; swap it in only if all of it is valid."""
        if self.config_path is None:
            return False
        try:
            engine = load(self.config_path)
        except ConfigError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running config:\n%s", exc)
            return False
        engine = self._instrumented(engine)
        if engine.settings.kafka != self.engine.settings.kafka:
            log.warning("kafka settings changed: they take effect after a restart")
        self.engine = engine
        if self.delivery is not None:
            self.delivery.swap_engine(engine)
        for callback in self.on_reload:
            callback(engine)
        self.metrics.reloads.labels("ok").inc()
        log.info("reloaded %s: %d rules", self.config_path, len(engine.rules.rules))
        return True


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)))


async def _quietly(awaitable: Awaitable[Any], timeout: float = 10.0) -> None:
    """Stop a client without letting a hung broker connection hang shutdown."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(awaitable, timeout)


def install_signals(service: Service, on_reload: Callable[[], object] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload or service.reload)


async def read_topic(options: dict[str, Any], topic: str) -> list[Any]:
    """Every record of ``topic`` up to its current end (no consumer group, nothing committed)."""
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **options)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while any(position < ends[tp] for tp, position in [(tp, await consumer.position(tp)) for tp in tps]):
            for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                records.extend(r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)])
        return records
    finally:
        await _quietly(consumer.stop())


async def replay(config_path: Path, *, source: Path | None, match: str | None, dry_run: bool, limit: int | None) -> int:
    """Route dead-lettered records (or the events of a file) again. A record dead-lettered for one
    rule and channel is re-delivered to that pair only; ``--dry-run`` prints instead of delivering."""
    engine = load(config_path)
    kafka = engine.settings.kafka
    inputs: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []
    if source is not None:
        inputs = [(str(source), source.read_bytes(), [])]
    else:
        for record in await read_topic(kafka.client_options(), kafka.dead_letter_topic):
            inputs.append(
                (f"{record.topic}/{record.partition}@{record.offset}", record.value, list(record.headers or ()))
            )
    channels = (
        {}
        if dry_run
        else {name: make_channel(name, c, kafka_defaults=kafka) for name, c in engine.settings.channels.items()}
    )
    delivery = None if dry_run else Delivery(engine, channels, Metrics())
    failed = replayed = 0
    try:
        for name, value, headers in inputs:
            facts = {k[len(DLQ_PREFIX) :]: v.decode(errors="replace") for k, v in headers if k.startswith(DLQ_PREFIX)}
            if match and match not in facts.get("reason", "") and match.encode() not in (value or b""):
                continue
            if limit is not None and replayed >= limit:
                break
            replayed += 1
            original = [(k, v) for k, v in headers if not k.startswith(DLQ_PREFIX)]
            events = (
                iter_events(name, value or b"", engine.limits)
                if not headers
                else iter([_decoded(value, original, engine, name)])
            )
            for event in events:
                if isinstance(event, DecodeError):
                    failed += 1
                    print(f"error: {event}", file=sys.stderr)
                    continue
                notifications = [
                    n
                    for n in engine.route(event).notifications
                    if facts.get("rule") in (None, n.rule) and facts.get("channel") in (None, n.channel)
                ]
                for notification in notifications:
                    if delivery is None:
                        print(orjson.dumps(notification.route_line()).decode())
                        continue
                    try:
                        outcome = await delivery.deliver(notification)
                        print(f"{outcome}: {name} {notification.rule} → {notification.channel}")
                    except DeliveryFailed as exc:
                        failed += 1
                        print(
                            f"failed: {name} {notification.rule} → {notification.channel}: {exc.reason}",
                            file=sys.stderr,
                        )
    finally:
        if delivery is not None:
            await delivery.close(engine.settings.service.drain_timeout_seconds)
    print(f"replayed {replayed} record(s), {failed} failure(s)", file=sys.stderr)
    return 1 if failed else 0


def _decoded(value: bytes | None, headers: list[tuple[str, bytes]], engine: Engine, name: str) -> Any:
    try:
        return decode(value, headers, limits=engine.limits, source=name)
    except DecodeError as exc:
        return exc


async def run_service(config_path: Path) -> int:
    engine = load(config_path)
    redactor = setup_logging(engine.settings)
    service = Service(engine, config_path)
    service.on_reload.append(lambda e: redactor.use(secret_values(e.settings)))
    install_signals(service)
    http = engine.settings.http
    ops = OpsServer(service, http.host, http.port) if http.enabled else None
    if ops is not None:
        await ops.start()
    watcher = asyncio.create_task(Watcher(service, engine.settings.service.reload_poll_seconds).run())
    try:
        await service.run()
    finally:
        watcher.cancel()
        if ops is not None:
            await ops.stop()
    return 0
