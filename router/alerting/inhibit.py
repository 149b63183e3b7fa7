"""``inhibit_rules``: an alert of a source rule mutes alerts of target rules whose ``equal`` keys match.

A source is seen by whichever replica routes it, while its targets may be owned by another replica (a
target's channel decides its owner), so sources travel on a topic every replica follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import Field

from router import jsoncodec
from router.alerting.timing import Duration
from router.channels.base import Frozen

log = logging.getLogger(__name__)

MAX_SOURCES = 100_000
MAX_FOR_SECONDS = 86_400.0  # an inhibit rule's `for` is at most a day, so older sources can be forgotten

# The values of a tuple of key expressions on the alert being judged.
ValuesOf = Callable[[tuple[str, ...]], tuple[Any, ...]]


class InhibitRule(Frozen):
    source_rules: tuple[str, ...] = Field(min_length=1)
    target_rules: tuple[str, ...] = Field(min_length=1)
    equal: tuple[str, ...] = Field(default=(), description="JMESPath on the rule root; all must be equal")
    for_: Duration = Field(
        default=600.0, alias="for", gt=0, le=MAX_FOR_SECONDS, description="a source inhibits targets this long (≤ 1d)"
    )


class InhibitionLog:
    """Inhibiting sources seen by any replica: (source rule, equal expressions, their values) → the latest
    time one was seen. Fed from ``kafka.inhibitions_topic``."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    @staticmethod
    def key(source_rule: str, equal: tuple[str, ...], values: tuple[Any, ...]) -> str:
        return jsoncodec.dumps([source_rule, equal, values], option=orjson.OPT_NON_STR_KEYS).decode()

    def add(self, key: str, seen: float) -> None:
        if seen > self._seen.get(key, float("-inf")):
            self._seen[key] = seen
        if len(self._seen) > MAX_SOURCES:  # bounded: forget sources older than any inhibit rule's `for`
            self.prune(seen - MAX_FOR_SECONDS)

    def apply(self, value: bytes | None, *, where: str) -> None:
        """One record of the inhibitions topic; a malformed one is logged (naming it) and skipped."""
        try:
            doc = orjson.loads(value or b"")
            self.add(str(doc["key"]), float(doc["seen"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: skipping a malformed inhibition record: %s: %s", where, type(exc).__name__, exc)

    @staticmethod
    def record(key: str, seen: float, event_id: str) -> bytes:
        return orjson.dumps({"key": key, "seen": seen, "event_id": event_id})

    def inhibited_by(
        self, rules: tuple[InhibitRule, ...], target_rule: str, values: ValuesOf, seen: float, now: float
    ) -> str | None:
        """Why an alert of ``target_rule`` first seen at ``seen`` is inhibited at ``now``, or None: a source
        with equal keys was seen no later than now, and the target no later than ``for`` after it."""
        for rule in rules:
            if target_rule not in rule.target_rules:
                continue
            equal = values(rule.equal)
            for source in rule.source_rules:
                at = self._seen.get(self.key(source, rule.equal, equal))
                if at is not None and at <= now and seen <= at + rule.for_:
                    shown = ", ".join(f"{e}={v!r}" for e, v in zip(rule.equal, equal, strict=True))
                    return f"inhibited by rule {source} ({shown or 'no equal keys'})"
        return None

    def prune(self, older_than: float) -> None:
        self._seen = {k: t for k, t in self._seen.items() if t >= older_than}
