"""The router's own topics: created when missing, and followed from their start by every replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

log = logging.getLogger(__name__)

# A follower retries a broker that is down (or a topic not created yet) this often at most: short, because
# what it follows (silences, inhibitions) must reach every replica within seconds of coming back.
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 5.0
# How long one fetch waits for new records: the delay before a new record is seen on an idle topic.
FETCH_WAIT_MS = 200


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    compact: bool


async def ensure_topics(options: dict[str, Any], topics: Mapping[str, TopicSpec], replication_factor: int) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are. Raises a KafkaError
    when the broker is unreachable or refuses a topic (naming it)."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                num_partitions=spec.partitions,
                replication_factor=replication_factor,
                topic_configs={"cleanup.policy": "compact"} if spec.compact else {},
            )
            for name, spec in topics.items()
            if name not in existing
        ]
        if not missing:
            return
        response = await admin.create_topics(missing)
        # create_topics reports per-topic errors in the response rather than raising them.
        created = []
        for name, code, *message in response.topic_errors:
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # another replica was first: fine
                error = for_code(code)
                raise error(f"creating topic {name!r}: {(message or [None])[0] or error.__name__}")
        if created:
            log.info("created topics %s", ", ".join(created))
    finally:
        await admin.close()


class TopicFollower:
    """Reads every partition of ``topic`` from its start, without a consumer group, and keeps following it;
    ``on_record`` (synchronous) sees each record once, in offset order per partition.

    ``caught_up`` is set once everything that was in the topic when the follower started has been given to
    ``on_record``. A broker that is down or a topic that does not exist yet is retried with backoff (and
    logged), never raised; a record whose callback raises is logged with its place and skipped.
    Partitions added to the topic after the follower connected are not followed until it reconnects.
    """

    def __init__(self, options: dict[str, Any], topic: str, on_record: Callable[[Any], None]) -> None:
        self.options = options
        self.topic = topic
        self.on_record = on_record
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Next offset to read per partition: a reconnect resumes there instead of reading it all again.
        self._positions: dict[TopicPartition, int] = {}
        # The end offsets seen on the first successful connection: what "caught up" means.
        self._initial_ends: dict[TopicPartition, int] | None = None
        self._backoff = INITIAL_BACKOFF

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=f"follow {self.topic}")

    def applied(self, partition: int, offset: int) -> bool:
        """Whether the record at ``offset`` of ``partition`` has been given to ``on_record``."""
        return self._positions.get(TopicPartition(self.topic, partition), 0) > offset

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _follow(self) -> None:
        missing = 0
        while True:
            try:
                await self._connect_and_read()
            except _NotYet:
                # Expected briefly at start-up while another process creates it: poll, do not back off far.
                missing += 1
                if missing == 1 or missing % 60 == 0:
                    log.warning("topic %s does not exist yet; waiting for it", self.topic)
                await asyncio.sleep(1.0)
            except Exception as exc:  # whatever the client raises, keep following: never die silently
                log.warning(
                    "following topic %s: %s: %s; reconnecting in %.1fs",
                    self.topic,
                    type(exc).__name__,
                    exc,
                    self._backoff,
                )
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _connect_and_read(self) -> None:
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            # A position the broker no longer has (retention after a long outage) restarts from the oldest
            # record, not the newest: skipping records would lose silences.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_WAIT_MS,
            **self.options,
        )
        try:
            await consumer.start()
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise _NotYet
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            for tp in tps:
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
                else:
                    await consumer.seek_to_beginning(tp)
            if self._initial_ends is None:
                self._initial_ends = await consumer.end_offsets(tps)
            self._backoff = INITIAL_BACKOFF
            log.debug("following topic %s, partitions %s", self.topic, [tp.partition for tp in tps])
            while True:
                if not self.caught_up.is_set() and await self._reached(consumer):
                    self.caught_up.set()
                for tp, records in (await consumer.getmany(timeout_ms=FETCH_WAIT_MS)).items():
                    for record in records:
                        self._positions[tp] = record.offset + 1
                        self._apply(record)
        finally:
            # A hung broker connection must not hang a reconnect or stop().
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5)

    async def _reached(self, consumer: AIOKafkaConsumer) -> bool:
        assert self._initial_ends is not None
        for tp, end in self._initial_ends.items():
            if await consumer.position(tp) < end:
                return False
        return True

    def _apply(self, record: Any) -> None:
        try:
            self.on_record(record)
        except Exception:  # one bad record must not stop the others
            log.exception(
                "%s/%d@%d: skipping a record that could not be applied", record.topic, record.partition, record.offset
            )


class _NotYet(Exception):
    """The topic does not exist yet."""
