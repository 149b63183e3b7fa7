"""Replay: dead-lettered records (or the events of a file) come in again and are routed anew."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from router import jsoncodec
from router.alerting.handoff import Handoff, SourceRecord
from router.decode import decode, iter_events
from router.engine import Engine, load
from router.errors import DecodeError
from router.sources.kafka import DLQ_PREFIX, produce, quietly, read_topic


async def replay(config_path: Path, *, source: Path | None, match: str | None, dry_run: bool, limit: int | None) -> int:
    """Route dead-lettered records (or the events of a file) again. A record dead-lettered for one rule and
    channel is sent to that pair only. The notifications are handed to their channels' owners (the running
    routers), so rate limits, groups and silences apply to them as to any; ``--dry-run`` prints instead."""
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
    producer = None if dry_run else AIOKafkaProducer(acks="all", **kafka.client_options())
    failed = replayed = 0
    try:
        if producer is not None:
            await producer.start()
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
            source_record = SourceRecord(
                facts.get("topic", name), int(facts.get("partition", 0)), int(facts.get("offset", 0)), None, value,
                tuple(original),
            )  # fmt: skip
            for event in events:
                if isinstance(event, DecodeError):
                    failed += 1
                    print(f"error: {event}", file=sys.stderr)
                    continue
                result = engine.route(event)
                notifications = [
                    n
                    for n in result.notifications
                    if facts.get("rule") in (None, n.rule) and facts.get("channel") in (None, n.channel)
                ]
                for notification in notifications:
                    if producer is None:
                        print(jsoncodec.dumps(notification.route_line()).decode())
                        continue
                    handoff = Handoff(notification, result.root, time.time(), source_record)
                    value = handoff.encode(kafka.handoff_format)
                    key = notification.channel.encode()
                    await produce(producer, kafka.notifications_topic, key=key, value=value)
                    print(f"handed off: {name} {notification.rule} → {notification.channel}")
    finally:
        if producer is not None:
            await quietly(producer.stop())
    print(f"replayed {replayed} record(s), {failed} failure(s)", file=sys.stderr)
    return 1 if failed else 0


def _decoded(value: bytes | None, headers: list[tuple[str, bytes]], engine: Engine, name: str) -> Any:
    try:
        return decode(value, headers, limits=engine.limits, source=name)
    except DecodeError as exc:
        return exc
