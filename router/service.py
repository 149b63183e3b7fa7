"""The service: consume IMM events from Kafka, route, hand each notification to its channel's owner,
manage and deliver it there, commit — at least once, with any number of replicas (see ``Service``).

Where events come in (the consumer loop, the dead-letter topic, replay) is router.sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from router import jsoncodec
from router.alerting.handoff import Handoff, SourceRecord
from router.alerting.inhibit import InhibitionLog
from router.alerting.manager import Manager
from router.alerting.silences import SilenceStore
from router.alerting.topics import TopicFollower, TopicSpec, ensure_topics
from router.channels import make_channel
from router.config import KafkaSettings
from router.decode import WireFormat, decode
from router.delivery.pipeline import Delivery
from router.engine import Engine, RouteResult, load
from router.errors import ConfigError, DecodeError
from router.metrics import Metrics
from router.ops import OpsServer, Watcher, secret_values, setup_logging
from router.partitioner import default_partition
from router.sources.kafka import (
    MAX_BACKOFF,
    Bounds,
    ConsumerStage,
    DeadLetters,
    Handler,
    produce,
    produce_all,
    quietly,
    where,
)

log = logging.getLogger(__name__)


class Changelog:
    """The notify stage's state, written to the twin partition of the notifications partition it is for."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def put(self, partition: int, key: str, value: dict[str, Any] | None) -> None:
        body = None if value is None else jsoncodec.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        await produce(self.producer, self.topic, key=key.encode(), value=body, partition=partition)

    async def read(self, reader: AIOKafkaConsumer, partitions: set[int]) -> dict[int, list[tuple[str, Any]]]:
        """Every entry of these partitions, oldest first, up to their ends now."""
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        entries: dict[int, list[tuple[str, Any]]] = {p: [] for p in partitions}
        if not tps:
            return entries
        reader.assign(tps)
        starts = await reader.beginning_offsets(tps)
        ends = await reader.end_offsets(tps)
        tps = [tp for tp in tps if ends[tp] > starts[tp]]  # most partitions of a new router are empty
        for tp in tps:
            reader.seek(tp, starts[tp])
        while True:
            behind = [tp for tp in tps if await reader.position(tp) < ends[tp]]
            if not behind:
                return entries
            for tp, records in (await reader.getmany(*behind, timeout_ms=500)).items():
                for r in records:
                    if r.key is not None:  # past the end too: see read_topic
                        try:
                            value = None if r.value is None else jsoncodec.loads(r.value)
                        except orjson.JSONDecodeError:
                            log.warning("%s: skipping a changelog entry that is not JSON", where(r))
                            continue
                        entries[tp.partition].append((r.key.decode(errors="replace"), value))


@dataclass(slots=True)
class Routed:
    """What routing made of one source record: records to produce, and what to do here at once."""

    record: Any
    sends: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    handoffs: list[Handoff | None] = field(default_factory=list)  # what each send carries, if a handoff
    inhibits: list[str] = field(default_factory=list)  # inhibiting-source keys
    dead_letters: list[tuple[str, dict[str, str | None]]] = field(default_factory=list)  # (reason, extra)
    seen: float = field(default_factory=time.time)


class Service:
    """Two consumer groups in one process, so that any number of replicas behaves as one router:

    - the routing stage reads the source topics (stateless: decode, rules, render) and hands every
      notification to ``kafka.notifications_topic``, keyed by channel; a source offset commits once its
      notifications are durably there;
    - the notify stage reads that topic in group ``<group_id>-notify``: each channel has one owner at a time,
      which keeps its rate limit, duplicates, throttles and groups (router.alerting.manager) and commits
      a handoff once it is delivered, merged into a delivered message, suppressed or dead-lettered.
    """

    def __init__(self, engine: Engine, config_path: Path | None = None, metrics: Metrics | None = None) -> None:
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.engine = self._instrumented(engine)
        self.stopping = asyncio.Event()
        self.producer: AIOKafkaProducer | None = None
        self.delivery: Delivery | None = None
        self.manager: Manager | None = None
        self.silences: SilenceStore | None = None
        self.inhibitions = InhibitionLog()
        self.routing: ConsumerStage | None = None
        self.notify: ConsumerStage | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._followers: list[TopicFollower] = []
        self.channel_health: dict[str, str] = {}
        self.on_reload: list[Callable[[Engine], None]] = []
        # Rules and rendering run off the event loop in one thread: a slow template (bounded by the render
        # budget) does not stall /healthz, heartbeats and the other records, and records are routed, and
        # so handed off, in the order they were read, as when routing ran on the loop.
        self._router_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="route")
        self._consumed = {f: self.metrics.records.labels(str(f)) for f in WireFormat}  # one lookup per record less

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.engine.settings
        channels = {
            name: make_channel(name, config, kafka_defaults=settings.kafka)
            for name, config in settings.channels.items()
        }
        self.delivery = Delivery(self.engine, channels, self.metrics, before_send=self._persist_limiter)
        health = asyncio.create_task(self.watch_channels())
        try:
            if await self._connect():
                assert self.routing is not None and self.notify is not None
                settle_heap()
                await asyncio.gather(self.routing.run(self.stopping), self.notify.run(self.stopping))
        finally:
            health.cancel()
            await self._shutdown()

    def stop(self) -> None:
        self.stopping.set()

    @property
    def committed(self) -> int:
        """Source offsets committed, summed over the owned partitions: records settled for good."""
        return self.routing.committed if self.routing is not None else 0

    @property
    def settled(self) -> int:
        """Source records routed and handed off, committed or not yet (commits go out every so often)."""
        return self.routing.settled if self.routing is not None else 0

    @property
    def peak_in_flight(self) -> int:
        return max((s.peak_in_flight for s in self._stages()), default=0)

    @property
    def owned_partitions(self) -> list[int]:
        """Partitions of the notifications topic this replica owns (and so the channels it sends to)."""
        return sorted(self.manager.partitions) if self.manager is not None else []

    @property
    def idle(self) -> bool:
        """Nothing consumed is waiting: every record and handoff so far is settled."""
        return all(s.in_flight == 0 and not s.tasks for s in self._stages())

    def _stages(self) -> list[ConsumerStage]:
        return [s for s in (self.routing, self.notify) if s is not None]

    async def _connect(self) -> bool:
        """Start the clients, create the router's topics and read the shared state, retrying with backoff."""
        kafka = self.engine.settings.kafka
        backoff = 1.0
        while not self.stopping.is_set():
            options = kafka.client_options()
            # Handoffs carry the event and its rendered notification (a few KB): aiokafka's 16 KB default
            # batch would hold three of them and cap the whole router at a few hundred a second.
            producer = AIOKafkaProducer(
                acks="all", linger_ms=2, max_batch_size=1_048_576, partitioner=default_partition, **options
            )
            started: list[Any] = [producer]
            try:
                await producer.start()
                await ensure_topics(options, router_topics(kafka), kafka.replication_factor)
                self.producer = producer
                await self._start_shared_state(options)
                started += [*self._followers]
                reader = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **options)
                started.append(reader)
                await reader.start()
                self._reader = reader
                # Both groups join at once: each join takes a while (session timeout / 2 on some brokers).
                self.routing, self.notify = await asyncio.gather(
                    self._start_stage("route", list(kafka.topics), kafka.group_id, None, options, started),
                    self._start_stage(
                        "notify",
                        [kafka.notifications_topic],
                        f"{kafka.group_id}-notify",
                        self._notify_record,
                        options,
                        started,
                    ),
                )
            except KafkaError as exc:
                for client in reversed(started):
                    await quietly(client.stop())
                self.producer = self._reader = self.silences = self.routing = self.notify = None
                self._followers = []
                log.warning(
                    "Kafka at %s unreachable (%s); retrying in %.0fs",
                    kafka.bootstrap_servers,
                    type(exc).__name__,
                    backoff,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            log.info(
                "consuming %s from %s as group %s; notifications via %s",
                ",".join(kafka.topics),
                kafka.bootstrap_servers,
                kafka.group_id,
                kafka.notifications_topic,
            )
            return True
        return False

    async def _start_shared_state(self, options: dict[str, Any]) -> None:
        """Silences and inhibiting sources: every replica reads both topics from the start and follows them."""
        kafka = self.engine.settings.kafka
        assert self.producer is not None and self.delivery is not None
        self.silences = SilenceStore(
            options, kafka.silences_topic, producer=self.producer, replication_factor=kafka.replication_factor
        )
        inhibitions = TopicFollower(
            options,
            kafka.inhibitions_topic,
            lambda r: self.inhibitions.apply(r.value, where=where(r)),
        )
        self._followers = [self.silences, inhibitions]
        for follower in self._followers:
            await follower.start()
        # No alert goes out before the silences and inhibiting sources already written are read (bounded: a
        # broker that answers but cannot serve them must not keep every alert back).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(f.caught_up.wait() for f in self._followers)), 10)
        silences = self.silences.silences
        self.metrics.silences_active.set_function(lambda: silences.active_count(datetime.now(UTC)))
        self.manager = Manager(
            self.engine,
            self.delivery,
            self.metrics,
            changelog=Changelog(self.producer, kafka.changelog_topic),
            dead_letter=self._dead_letter_handoff,
            silences=self.silences.silences,
            inhibitions=self.inhibitions,
        )

    async def _start_stage(
        self,
        name: str,
        topics: list[str],
        group_id: str,
        handler: Handler | None,
        options: dict[str, Any],
        started: list[Any],
    ) -> ConsumerStage:
        """The notify stage takes one handoff at a time (``handler``); routing takes whole fetches."""
        kafka, service = self.engine.settings.kafka, self.engine.settings.service
        consumer = AIOKafkaConsumer(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            **options,
        )
        notify = name == "notify"
        bounds = Bounds(
            max_in_flight=service.max_pending_notifications if notify else service.max_in_flight,
            max_in_flight_per_partition=(
                service.max_pending_notifications if notify else service.max_in_flight_per_partition
            ),
            commit_interval_seconds=service.commit_interval_seconds,
            commit_every_records=service.commit_every_records,
            revoke_timeout_seconds=min(10.0, service.drain_timeout_seconds),
        )
        stage = ConsumerStage(
            name,
            consumer,
            bounds,
            self.metrics,
            handler,
            batch_handler=None if notify else self._route_batch,
            on_assigned=self._assigned if notify else None,
            on_revoked=self._revoked if notify else None,
            on_paused=lambda: self.metrics.paused.set(int(any(s.paused for s in self._stages()))),
        )
        consumer.subscribe(topics, listener=stage.listener())
        started.append(consumer)
        await consumer.start()
        return stage

    async def _shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the drain deadline, commit, close."""
        drain = self.engine.settings.service.drain_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        if self.routing is not None:
            await self.routing.drain(drain * 0.4)  # routing only produces: quick
        if self.manager is not None:
            await self.manager.close(max(0.5, drain * 0.4))
        if self.delivery is not None:
            await self.delivery.close(max(0.5, deadline - loop.time()))
        for stage in self._stages():
            await stage.drain(max(0.1, deadline - loop.time()))
            stage.cancel()
        for stage in self._stages():
            await stage.commit(force=True)
            await quietly(stage.consumer.stop(), timeout=5.0)
        for client in [*self._followers, self._reader, self.producer]:
            if client is not None:
                await quietly(client.stop(), timeout=5.0)
        self._router_thread.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    # --- routing stage: the records of one fetch ----------------------------------------------------

    async def _route_batch(self, tp: TopicPartition, records: list[Any]) -> None:
        """Decode, route and render a fetched batch in one hop to the routing thread, then hand every
        notification off and wait for the broker once for them all; the stage settles the records after."""
        engine = self.engine  # a reload swaps self.engine; the batch keeps the one it started with
        self.metrics.in_flight.inc(len(records))
        try:
            loop = asyncio.get_running_loop()
            routed = await loop.run_in_executor(self._router_thread, self._route_all, engine, records)
            assert self.producer is not None
            messages: list[tuple[str, bytes, bytes]] = []
            owners: list[Routed] = []  # the record each message is for
            handoffs: list[Handoff | None] = []
            for r in routed:
                for reason, extra in r.dead_letters:
                    await self._dead_letter(r.record, reason, **extra)
                for key in r.inhibits:
                    self.inhibitions.add(key, r.seen)  # here at once; other replicas within a fetch
                messages += r.sends
                owners += [r] * len(r.sends)
                handoffs += r.handoffs
            results = await produce_all(self.producer, messages)
            # A hand-off over the size limit can never reach its owner: its source record goes to the
            # dead-letter topic instead (once, whatever else it made), and the rest of the batch goes on.
            too_large = {id(r): (r, res) for r, res in zip(owners, results, strict=True) if isinstance(res, Exception)}
            for r, err in too_large.values():
                await self._dead_letter(r.record, f"handoff too large to produce: {err}")
            sent = 0
            for handoff, result in zip(handoffs, results, strict=True):
                if handoff is not None and isinstance(result, RecordMetadata):
                    sent += 1
                    self._take(handoff, result)
            self.metrics.handoffs.inc(sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the batch, nor hold its partition's commits forever
            log.exception(
                "unexpected error handing off %s and the %d records after it", where(records[0]), len(records) - 1
            )
            for record in records:
                await self._dead_letter(record, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.in_flight.dec(len(records))

    def _route_all(self, engine: Engine, records: list[Any]) -> list[Routed]:
        """In the routing thread: what the records make (those that make nothing are left out). Nothing
        here waits on the broker."""
        routed = []
        for record in records:
            try:
                made = self._route_one(engine, record)
            except Exception as exc:  # a bug must not lose the record: dead-letter it with the reason
                log.exception("unexpected error routing %s", where(record))
                made = Routed(record, dead_letters=[(f"internal error: {type(exc).__name__}: {exc}", {})])
            if made is not None:
                routed.append(made)
        return routed

    def _route_one(self, engine: Engine, record: Any) -> Routed | None:
        try:
            event = decode(record.value, record.headers or (), limits=engine.limits)
        except DecodeError as exc:
            self.metrics.decode_failures.inc()
            named = DecodeError(exc.reason, source=where(record))  # named here: most records decode
            log.warning("dead-lettering undecodable record: %s", named)
            return Routed(record, dead_letters=[(f"decode: {exc.reason}", {})])
        self._consumed[event.wire_format].inc()
        result = engine.route(event)
        if not (result.notifications or result.matched or result.failures):
            return None
        routed = Routed(record)
        for rule in {n.rule for n in result.notifications}:
            self.metrics.rule_matches.labels(rule).inc()
        for failure in result.failures:
            self.metrics.render_failures.labels(failure.channel).inc()
            extra: dict[str, str | None] = {"rule": failure.rule, "channel": failure.channel, "event_id": event.id}
            routed.dead_letters.append((f"render: {failure.reason}", extra))
        if result.notifications or result.matched:
            self._hand_off(engine, result, routed)
        return routed

    def _hand_off(self, engine: Engine, result: RouteResult, routed: Routed) -> None:
        """The records for the notifications' owners, and the inhibiting sources for every replica."""
        kafka, record = engine.settings.kafka, routed.record
        source = SourceRecord(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            tuple(record.headers or ()),
            record.timestamp,
        )
        for n in result.notifications:
            handoff = Handoff(n, result.root, routed.seen, source)
            routed.sends.append((kafka.notifications_topic, n.channel.encode(), handoff.encode(kafka.handoff_format)))
            routed.handoffs.append(handoff)
        event_id = result.notifications[0].event_id if result.notifications else source.where
        for rule in result.matched:
            for index in engine.inhibit_sources.get(rule, ()):
                inhibit = engine.settings.inhibit_rules[index]
                key = InhibitionLog.key(rule, inhibit.equal, engine.values(inhibit.equal, result.root))
                routed.inhibits.append(key)
                value = InhibitionLog.record(key, routed.seen, event_id)
                routed.sends.append((kafka.inhibitions_topic, key.encode(), value))
                routed.handoffs.append(None)

    def _take(self, handoff: Handoff, written: RecordMetadata) -> None:
        """A handoff just written to a notifications partition this replica owns goes to its notify stage
        at once, not after a fetch brings it back (one broker round trip less, and no decoding); the
        stage skips it when it comes. Committed, and taken over after a crash, as any handoff."""
        if self.notify is None or self.manager is None or written.partition not in self.manager.partitions:
            return
        tp = TopicPartition(written.topic, written.partition)
        if self.notify.take(tp, written.offset, lambda settle: self._accept(tp, handoff, settle)):
            self.metrics.handoffs_taken.inc()

    # --- notify stage: one handoff ----------------------------------------------------------------

    async def _notify_record(self, tp: TopicPartition, record: Any, settle: Callable[[], None]) -> None:
        try:
            handoff = Handoff.decode(record.value, where=f"{tp.topic}/{tp.partition}@{record.offset}")
        except DecodeError as exc:
            log.warning("dead-lettering a malformed handoff: %s", exc)
            await self._dead_letter(record, f"handoff: {exc.reason}")
            settle()
            return
        await self._accept(tp, handoff, settle)

    async def _accept(self, tp: TopicPartition, handoff: Handoff, settle: Callable[[], None]) -> None:
        assert self.manager is not None
        try:
            await self.manager.accept(tp.partition, handoff, settle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the alert: dead-letter its source with the reason
            log.exception("unexpected error handling %s", handoff.source.where)
            await self._dead_letter_handoff(handoff, f"internal error: {type(exc).__name__}: {exc}", 0)
            settle()

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        """Take over channels: read their state from the changelog before their first handoff."""
        assert self.manager is not None and self._reader is not None
        kafka = self.engine.settings.kafka
        partitions = {tp.partition for tp in assigned}
        entries = await Changelog(self.producer, kafka.changelog_topic).read(self._reader, partitions)
        for partition, changelog in entries.items():
            self.manager.assign(partition, changelog)
        self.metrics.owned_partitions.set(len(self.manager.partitions))
        log.info("owning %s partitions %s", kafka.notifications_topic, self.owned_partitions)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        assert self.manager is not None
        partitions = {tp.partition for tp in revoked}
        self.manager.revoke(partitions)
        flushes = self.manager.flushes_of(partitions)
        if flushes:
            await asyncio.wait(flushes, timeout=min(10.0, self.engine.settings.service.drain_timeout_seconds))
        self.metrics.owned_partitions.set(len(self.manager.partitions))
        if partitions:
            log.info("released %s partitions %s", self.engine.settings.kafka.notifications_topic, sorted(partitions))

    async def _persist_limiter(self, channel: str, logs: list[list[float]]) -> None:
        if self.manager is not None:
            await self.manager.persist_limiter(channel, logs)

    # --- dead letters -----------------------------------------------------------------------------

    async def _dead_letter(self, record: Any, reason: str, **extra: str | None) -> None:
        await self._dead_letters().record(record, reason, **extra)

    async def _dead_letter_handoff(self, handoff: Handoff, reason: str, attempts: int) -> None:
        n, src = handoff.notification, handoff.source
        extra = {"rule": n.rule, "channel": n.channel, "event_id": n.event_id, "attempts": str(attempts)}
        await self._dead_letters().produce(
            src.key, src.value, src.headers, f"delivery: {reason}", src.topic, src.partition, src.offset, extra
        )

    def _dead_letters(self) -> DeadLetters:
        assert self.producer is not None
        return DeadLetters(self.producer, self.engine.settings.kafka.dead_letter_topic, self.metrics)

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
            "notifications_topic": self.engine.settings.kafka.notifications_topic,
            "owned_partitions": self.owned_partitions,
            "owned_channels": sorted(self.manager.channel_partition) if self.manager is not None else [],
            "silences_active": self.silences.silences.active_count(datetime.now(UTC)) if self.silences else 0,
        }

    async def watch_channels(self) -> None:
        """Check every channel's health now and then, for /readyz; refresh the silences gauge."""
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    def _instrumented(self, engine: Engine) -> Engine:
        engine.rules.on_error = lambda rule: self.metrics.rule_errors.labels(rule.name).inc()
        for warning in engine.warnings:  # what `imm-router check` warns about, at start and on each reload
            log.warning("config: %s", warning)
        return engine

    # --- hot reload -----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load and validate the config again and build what it needs; swap it all in at once only if every
        step succeeded. A failure is logged and counted and leaves the running config as it was."""
        if self.config_path is None:
            return False
        try:
            engine = self._instrumented(load(self.config_path))
            fresh = self.delivery.channels_for(engine) if self.delivery is not None else {}
        except Exception as exc:  # ConfigError, or whatever a broken file provokes: never the watcher's end
            self.metrics.reloads.labels("failed").inc()
            detail = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("reload failed, keeping the running config:\n%s", detail)
            return False
        if engine.settings.kafka != self.engine.settings.kafka:
            log.warning("kafka settings changed: they take effect after a restart")
        self.engine = engine
        if self.delivery is not None:
            self.delivery.swap_engine(engine, fresh)
        if self.manager is not None:
            self.manager.swap_engine(engine)
        for callback in self.on_reload:
            callback(engine)
        settle_heap()
        self.metrics.reloads.labels("ok").inc()
        log.info("reloaded %s: %d rules", self.config_path, len(engine.rules.rules))
        return True


def settle_heap() -> None:
    """Move what lives as long as the config (compiled rules and templates, clients, modules) out of the
    collector's sight: a full collection then scans only what events made, a few ms instead of ~100 ms
    of stalled event loop. Run again after a reload, so the old config's cycles can still be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def router_topics(kafka: KafkaSettings) -> dict[str, TopicSpec]:
    """The topics the router itself uses; the changelog twins the notifications topic partition by partition."""
    return {
        kafka.notifications_topic: TopicSpec(kafka.notifications_partitions, compact=False),
        kafka.changelog_topic: TopicSpec(kafka.notifications_partitions, compact=True),
        kafka.silences_topic: TopicSpec(1, compact=True),
        kafka.inhibitions_topic: TopicSpec(1, compact=True),
        kafka.dead_letter_topic: TopicSpec(kafka.notifications_partitions, compact=False),
    }


def install_signals(service: Service, on_reload: Callable[[], object] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload or service.reload)


async def run_service(config_path: Path, *, worker: tuple[int, Callable[[int], None]] | None = None) -> int:
    """The router, or with ``service.workers`` > 1 the supervisor of that many. ``worker``: this process is
    worker ``index`` of a supervisor, and serves its ops endpoints on a local port it reports."""
    engine = load(config_path)
    redactor = setup_logging(engine.settings)
    if worker is None and engine.settings.service.workers > 1:
        from router.workers import Supervisor

        return await Supervisor(engine, config_path).run()
    service = Service(engine, config_path)
    service.on_reload.append(lambda e: redactor.use(secret_values(e.settings)))
    install_signals(service)
    http = engine.settings.http
    ops = None
    if http.enabled:
        ops = OpsServer(service, "127.0.0.1", 0) if worker is not None else OpsServer(service, http.host, http.port)
        await ops.start()
        if worker is not None:
            worker[1](ops.port)
    watcher = asyncio.create_task(Watcher(service, engine.settings.service.reload_poll_seconds).run())
    try:
        await service.run()
    finally:
        watcher.cancel()
        if ops is not None:
            await ops.stop()
    return 0
