"""``imm-router route --explain``: for each event, which rules matched and what the owner of each channel
would do with the notification now — silenced (by the silences in Kafka now), inhibited (by sources
among the events given, in order, and in the inhibitions topic), muted by a time interval, throttled or
grouped — and why."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from router.alerting.handoff import Handoff, SourceRecord
from router.alerting.inhibit import InhibitionLog
from router.alerting.manager import suppression
from router.alerting.silences import SilenceSet
from router.alerting.timing import format_duration
from router.decode import iter_events
from router.engine import Engine
from router.errors import DecodeError
from router.rules import Notify


def explain(engine: Engine, inputs: Iterable[tuple[str, bytes]], out: TextIO) -> int:
    silences, inhibitions, note = asyncio.run(_shared_state(engine))
    if note:
        out.write(f"# {note}\n")
    failed = False
    for name, raw in inputs:
        for event in iter_events(name, raw, engine.limits):
            if isinstance(event, DecodeError):
                failed = True
                out.write(f"{name}: error: {event}\n")
                continue
            result = engine.route(event)
            now = time.time()
            out.write(f"event {event.id} ({event.type}): matched {', '.join(result.matched) or 'no rule'}\n")
            for rule in result.matched:
                for index in engine.inhibit_sources.get(rule, ()):
                    inhibit = engine.settings.inhibit_rules[index]
                    key = InhibitionLog.key(rule, inhibit.equal, engine.values(inhibit.equal, result.root))
                    inhibitions.add(key, now)
            source = SourceRecord(name, 0, 0, None, None, ())
            for n in result.notifications:
                target = engine.targets.get((n.rule, n.channel, n.template))
                handoff = Handoff(n, result.root, now, source)
                why = suppression(engine, handoff, target, now, silences, inhibitions)
                verdict = f"{why[0]}: {why[1]}" if why else _plan(engine, target, handoff)
                out.write(f"  {n.rule} → {n.channel}: {verdict}\n")
            for failure in result.failures:
                failed = True
                out.write(f"  {failure.rule} → {failure.channel}: render error: {failure.reason}\n")
    return 1 if failed else 0


def _plan(engine: Engine, target: Notify | None, handoff: Handoff) -> str:
    if target is None or not target.managed:
        return "sent at once"
    parts = []
    if target.throttle is not None:
        values = engine.values(target.throttle.key, handoff.root)
        shown = _shown(target.throttle.key, values)
        parts.append(
            f"throttled by {shown} for {format_duration(target.throttle.for_)}: sent if no message for this key "
            "went out within that time, else held for one summary"
        )
    if target.group_by is not None:
        values = engine.values(target.group_by, handoff.root)
        parts.append(
            f"grouped by {_shown(target.group_by, values)}: a new group waits {format_duration(target.group_wait)}, "
            f"a live one sends at most every {format_duration(target.group_interval)}"
        )
    return "; ".join(parts)


def _shown(exprs: tuple[str, ...], values: tuple[Any, ...]) -> str:
    return ", ".join(f"{e}={v!r}" for e, v in zip(exprs, values, strict=True))


async def _shared_state(engine: Engine) -> tuple[SilenceSet, InhibitionLog, str]:
    """The silences and inhibiting sources in Kafka now; without Kafka, none (and a note saying so)."""
    from router.sources.kafka import read_topic

    kafka = engine.settings.kafka
    silences, inhibitions = SilenceSet(), InhibitionLog()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the note below says it once
    try:
        options = kafka.client_options()
        for record in await asyncio.wait_for(read_topic(options, kafka.silences_topic), 10):
            silences.apply(record.key, record.value, where=f"{record.topic}/{record.partition}@{record.offset}")
        for record in await asyncio.wait_for(read_topic(options, kafka.inhibitions_topic), 10):
            inhibitions.apply(record.value, where=f"{record.topic}/{record.partition}@{record.offset}")
    except (KafkaError, TimeoutError, OSError) as exc:
        return silences, inhibitions, f"silences and inhibitions not read: Kafka at {kafka.bootstrap_servers}: {exc}"
    return silences, inhibitions, ""
