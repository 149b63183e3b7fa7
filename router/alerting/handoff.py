"""The record a routing replica hands to the owner of a channel through ``kafka.notifications_topic``.

Keyed by channel, so the consumer group gives every channel exactly one owner at a time. It carries
the rendered notification, the rule root (silences, inhibitions, ``group_by`` and throttle keys are
evaluated by the owner, when it sends) and the source record itself, so that a notification given
up by its owner is dead-lettered with the original key, value and headers, as if never handed over.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from router import jsoncodec
from router.errors import DecodeError
from router.notification import Notification


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None = None

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class Handoff:
    notification: Notification
    root: dict[str, Any]  # what the rule's `when` saw: payload, `imm` and `event`
    seen: float  # epoch seconds the routing replica routed it
    source: SourceRecord

    @property
    def record_time(self) -> float | None:
        ts = self.source.timestamp_ms
        return ts / 1000 if ts is not None else None

    def encode(self) -> bytes:
        n, src = self.notification, self.source
        return jsoncodec.dumps(
            {
                "n": {
                    "event_id": n.event_id,
                    "event_type": n.event_type,
                    "rule": n.rule,
                    "channel": n.channel,
                    "template": n.template,
                    "severity": n.severity,
                    "payload": n.payload,
                    "summary": n.summary,
                },
                "root": self.root,
                "seen": self.seen,
                "src": {
                    "topic": src.topic,
                    "partition": src.partition,
                    "offset": src.offset,
                    "key": _b64(src.key),
                    "value": _b64(src.value),
                    "headers": [[k, _b64(v)] for k, v in src.headers],
                    "ts": src.timestamp_ms,
                },
            },
            option=orjson.OPT_NON_STR_KEYS,
        )

    @classmethod
    def decode(cls, raw: bytes | None, *, where: str) -> Handoff:
        """Raises DecodeError naming ``where`` for anything that is not a handoff record."""
        try:
            doc = jsoncodec.loads(raw or b"")
            n, src, root = doc["n"], doc["src"], doc["root"]
            notification = Notification(
                event_id=str(n["event_id"]),
                event_type=str(n["event_type"]),
                rule=str(n["rule"]),
                channel=str(n["channel"]),
                template=str(n["template"]),
                severity=str(n["severity"]),
                payload=dict(n["payload"]),
                summary=str(n.get("summary", "")),
                view=dict(root.get("imm") or {}),
            )
            source = SourceRecord(
                topic=str(src["topic"]),
                partition=int(src["partition"]),
                offset=int(src["offset"]),
                key=_unb64(src.get("key")),
                value=_unb64(src.get("value")),
                headers=tuple((str(k), _unb64(v) or b"") for k, v in src.get("headers", ())),
                timestamp_ms=src.get("ts"),
            )
            return cls(notification, dict(root), float(doc["seen"]), source)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(
                f"not a notification handoff record ({type(exc).__name__}: {exc})", source=where
            ) from None


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)
