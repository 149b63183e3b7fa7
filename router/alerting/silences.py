"""Silences: Alertmanager's, for the router's alerts, created at run time (``imm-router silence add`` or
``POST /api/v1/silences``) and shared by every replica through ``kafka.silences_topic``.

The topic is compacted and keyed by silence id; each record is the silence's latest JSON (a tombstone
deletes it). Every replica reads it from the start and follows it (:class:`SilenceStore`), so a silence
applies everywhere within a fetch wait of being written and survives restarts. Nothing is ever
deleted by the router: expiring a silence rewrites it with ``ends_at = now``.

A silence mutes an alert while it is active when its ``match`` (JMESPath on the rule root: the IMM
payload plus ``imm`` and ``event``, exactly what a rule's ``when`` sees) is true on the alert, and its
``rule`` and ``channel``, when given, are the alert's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from jmespath.exceptions import JMESPathError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from router.alerting.topics import TopicFollower, TopicSpec, ensure_topics
from router.errors import ConfigError, RouterError
from router.expr import truthy
from router.rules import compile_expression, search

log = logging.getLogger(__name__)

State = Literal["active", "pending", "expired"]

# Expired silences are listed (and kept in memory) this long after they end, so that one expired by
# mistake can be seen and added again.
RECENTLY_EXPIRED = timedelta(days=1)
_STATE_ORDER: dict[State, int] = {"active": 0, "pending": 1, "expired": 2}


class InvalidSilence(ConfigError):
    """A silence that cannot be added; the message names the field and what to give instead."""


class UnknownSilence(RouterError):
    """No silence has this id (or it expired long ago)."""


class Silence(BaseModel):
    """One silence, as stored on the topic (JSON, keyed by ``id``). Times are timezone-aware."""

    # Unknown keys are ignored, not errors: during a rolling upgrade older replicas must still apply
    # silences written by newer ones.
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex")
    match: str = Field(min_length=1, description="JMESPath on the rule root; must be truthy")
    rule: str | None = Field(default=None, min_length=1)
    channel: str | None = Field(default=None, min_length=1)
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    comment: str = Field(min_length=1)
    author: str = Field(min_length=1)
    created_at: AwareDatetime
    updated_at: AwareDatetime

    def state(self, now: datetime) -> State:
        if now < self.starts_at:
            return "pending"
        return "active" if now < self.ends_at else "expired"

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def doc(self, now: datetime) -> dict[str, Any]:
        """The JSON shown to people (API, CLI): the stored fields plus ``state`` at ``now``."""
        return {**self.model_dump(mode="json"), "state": self.state(now)}


def new_silence(
    match: str,
    *,
    ends_at: datetime,
    comment: str,
    author: str,
    rule: str | None = None,
    channel: str | None = None,
    starts_at: datetime | None = None,
    now: datetime | None = None,
) -> Silence:
    """A new silence with a fresh id, validated: ``match`` compiles, both times carry a time zone,
    ``ends_at`` is after ``starts_at`` (default: now) and in the future, comment and author are not
    blank. Raises InvalidSilence naming the field."""
    now = now or datetime.now(UTC)
    match = match.strip()
    if not match:
        raise InvalidSilence("match is empty: give a JMESPath condition, e.g. imm.project == 'staging'")
    try:
        compile_expression(match, what="match")
    except ConfigError as exc:
        raise InvalidSilence(str(exc)) from None
    for name, value in (("rule", rule), ("channel", channel)):
        if value is not None and not value.strip():
            raise InvalidSilence(f"{name} is empty: give a {name} name or leave it out (any {name})")
    starts_at = starts_at or now
    for name, moment in (("starts_at", starts_at), ("ends_at", ends_at)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise InvalidSilence(
                f"{name} {moment.isoformat()} has no time zone: give one, e.g. 2026-12-01T08:00:00+08:00"
            )
    if ends_at <= starts_at:
        raise InvalidSilence(f"ends_at {ends_at.isoformat()} is not after starts_at {starts_at.isoformat()}")
    if ends_at <= now:
        raise InvalidSilence(f"ends_at {ends_at.isoformat()} is in the past (now {now.isoformat()})")
    if not comment.strip():
        raise InvalidSilence("comment is empty: say why these alerts are silenced (a ticket, an incident)")
    if not author.strip():
        raise InvalidSilence("author is empty: say who adds the silence")
    return Silence(
        id=uuid.uuid4().hex,
        match=match,
        rule=rule,
        channel=channel,
        starts_at=starts_at,
        ends_at=ends_at,
        comment=comment.strip(),
        author=author.strip(),
        created_at=now,
        updated_at=now,
    )


def check_names(rule: str | None, channel: str | None, rules: Collection[str], channels: Collection[str]) -> None:
    """Raise InvalidSilence when ``rule`` or ``channel`` is not one the config knows (listing those)."""
    for kind, name, known in (("rule", rule, rules), ("channel", channel, channels)):
        if name is not None and name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InvalidSilence(f"unknown {kind} {name!r}; the config's {kind}s are: {listed}")


@dataclass(frozen=True)
class _Entry:
    silence: Silence
    expression: Any  # jmespath ParsedResult, compiled once


class SilenceSet:
    """The silences of the topic, in memory (no I/O): fed record by record with :meth:`apply`."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._failing: set[str] = set()  # silences whose match raised on an alert: logged once each

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, key: bytes | None, value: bytes | None, *, where: str) -> None:
        """One record of the silences topic: the latest write per id wins, a tombstone removes it. A
        malformed record is logged as a warning naming ``where`` and the problem, and skipped."""
        if key is None:
            log.warning("%s: skipping a silence record without a key (the key is the silence id)", where)
            return
        silence_id = key.decode(errors="replace")
        if value is None:
            self._entries.pop(silence_id, None)
            return
        try:
            silence = Silence.model_validate_json(value)
        except ValidationError as exc:
            log.warning("%s: skipping a malformed silence record: %s", where, _problems(exc))
            return
        if silence.id != silence_id:
            log.warning("%s: skipping a silence record keyed %r whose id is %r", where, silence_id, silence.id)
            return
        try:
            expression = compile_expression(silence.match, what=f"silence {silence.id}: match")
        except ConfigError as exc:
            log.warning("%s: skipping a malformed silence record: %s", where, exc)
            return
        if silence.ends_at < datetime.now(UTC) - RECENTLY_EXPIRED:
            # Long over: neither active nor listed again. Dropped so memory does not grow with history.
            self._entries.pop(silence_id, None)
            return
        self._entries[silence_id] = _Entry(silence, expression)
        self._failing.discard(silence_id)

    def get(self, silence_id: str) -> Silence | None:
        entry = self._entries.get(silence_id)
        return entry.silence if entry is not None else None

    def silenced_by(self, root: dict[str, Any], rule: str, channel: str, now: datetime) -> Silence | None:
        """The first silence muting an alert of ``rule`` to ``channel`` whose rule root is ``root``, at
        ``now`` (timezone-aware), or None. A match that fails on this root does not match it."""
        for entry in self._entries.values():
            silence = entry.silence
            if not silence.starts_at <= now < silence.ends_at:
                continue
            if (silence.rule is not None and silence.rule != rule) or (
                silence.channel is not None and silence.channel != channel
            ):
                continue
            try:
                if truthy(search(entry.expression, root)):
                    return silence
            except (JMESPathError, TypeError, ValueError, RecursionError) as exc:
                if silence.id not in self._failing:
                    self._failing.add(silence.id)
                    log.warning(
                        "silence %s (%s) failed on an alert of rule %s and does not match it: %s",
                        silence.id,
                        silence.match,
                        rule,
                        exc,
                    )
        return None

    def same_as(self, match: str, rule: str | None, channel: str | None, now: datetime) -> list[Silence]:
        """Active silences with the same condition (compared parsed, so spacing does not matter), rule
        and channel."""
        parsed = compile_expression(match, what="match").parsed
        return [
            e.silence
            for e in self._entries.values()
            if e.silence.state(now) == "active"
            and e.silence.rule == rule
            and e.silence.channel == channel
            and e.expression.parsed == parsed
        ]

    def listing(self, now: datetime) -> list[Silence]:
        """Active, then pending, then those expired less than a day ago; each by end time."""
        shown = [
            e.silence
            for e in self._entries.values()
            if e.silence.state(now) != "expired" or now - e.silence.ends_at < RECENTLY_EXPIRED
        ]
        return sorted(shown, key=lambda s: (_STATE_ORDER[s.state(now)], s.ends_at))

    def active_count(self, now: datetime) -> int:
        return sum(1 for e in self._entries.values() if e.silence.state(now) == "active")


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" if error["loc"] else error["msg"]
        for error in exc.errors(include_url=False)
    )


class SilenceStore(TopicFollower):
    """A :class:`SilenceSet` (``silences``) kept current by following the silences topic, and the writes.

    ``start`` creates the topic when missing (1 partition, compacted) and the producer (unless one is
    given), then follows the topic from its start; ``caught_up`` is set once every silence written
    before is applied. Writes are acknowledged by all in-sync replicas (the given producer must be
    ``acks="all"``) and return once this store has applied them.
    """

    def __init__(
        self,
        options: dict[str, Any],
        topic: str,
        *,
        producer: AIOKafkaProducer | None = None,
        replication_factor: int = 1,
        visible_timeout: float = 10.0,
    ) -> None:
        super().__init__(options, topic, self._on_record)
        self.silences = SilenceSet()
        self.replication_factor = replication_factor
        self.visible_timeout = visible_timeout
        self._producer = producer
        self._own_producer = producer is None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await ensure_topics(self.options, {self.topic: TopicSpec(1, compact=True)}, self.replication_factor)
        if self._producer is None:
            producer = AIOKafkaProducer(acks="all", **self.options)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                raise
            self._producer = producer
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._own_producer and self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

    def _on_record(self, record: Any) -> None:
        where = f"{record.topic}/{record.partition}@{record.offset}"
        try:
            self.silences.apply(record.key, record.value, where=where)
        finally:
            # Wake every waiter; each checks its own condition. A fresh event for the next change.
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_applied(self, silence_id: str, predicate: Callable[[Silence | None], bool], timeout: float) -> bool:
        """Wait until ``predicate(silences.get(silence_id))`` holds; False if it does not within ``timeout``."""
        return await self._wait(lambda: predicate(self.silences.get(silence_id)), timeout)

    async def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not condition():
                    await self._changed.wait()
                return True
        return False

    async def add(
        self,
        match: str,
        *,
        ends_at: datetime,
        comment: str,
        author: str,
        rule: str | None = None,
        channel: str | None = None,
        starts_at: datetime | None = None,
    ) -> Silence:
        """Validate (see :func:`new_silence`; raises InvalidSilence), write and return the new silence."""
        silence = new_silence(
            match, ends_at=ends_at, comment=comment, author=author, rule=rule, channel=channel, starts_at=starts_at
        )
        await self._write(silence)
        return silence

    async def expire(self, silence_id: str) -> Silence:
        """End a silence now (a pending one never starts). Raises UnknownSilence. An already expired
        silence is returned as it is."""
        current = self.silences.get(silence_id)
        if current is None:
            raise UnknownSilence(f"no silence with id {silence_id!r} (see `imm-router silence list`)")
        now = datetime.now(UTC)
        if current.state(now) == "expired":
            return current
        expired = current.model_copy(
            update={"starts_at": min(current.starts_at, now), "ends_at": now, "updated_at": now}
        )
        await self._write(expired)
        return expired

    async def _write(self, silence: Silence) -> None:
        if self._producer is None:
            raise RuntimeError("SilenceStore.start() must be awaited before writing")
        written = await self._producer.send_and_wait(self.topic, key=silence.id.encode(), value=silence.to_json())
        # Read your own writes: callers list or answer right after. By offset, not by content, so that a
        # concurrent write to the same id (from another replica) cannot keep us waiting.
        applied = await self._wait(lambda: self.applied(written.partition, written.offset), self.visible_timeout)
        if not applied:  # the write is durable all the same
            log.warning(
                "silence %s is written to %s but not read back within %.0fs",
                silence.id,
                self.topic,
                self.visible_timeout,
            )
