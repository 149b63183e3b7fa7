"""The record a routing replica hands to the owner of a channel through ``kafka.notifications_topic``.

Keyed by channel, so the consumer group gives every channel exactly one owner at a time. It carries
the rendered notification, the rule root (silences, inhibitions, ``group_by`` and throttle keys are
evaluated by the owner, when it sends) and the source record itself, so that a notification given
up by its owner is dead-lettered with the original key, value and headers, as if never handed over.

Wire format (version 2): ``MAGIC``, the byte lengths of two JSON documents (big-endian u32 each), the
notification with its source record's coordinates, the rule root (its ``imm``, the notification's view,
written as null: it is in the first document already), then the source record's value as it was. The
owner parses the root only when something reads it (a silence, an inhibition, a group or throttle
key): most alerts are sent without it. Version 1 (one JSON document, the value in base64) is
still read, so that alerts a previous version handed off, and held in groups, survive an upgrade.
"""

from __future__ import annotations

import base64
import logging
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from router import jsoncodec
from router.errors import DecodeError
from router.notification import Notification

log = logging.getLogger(__name__)

MAGIC = b"\x00H2"  # no JSON document starts with NUL: version 1 records start with "{"
_LENGTHS = struct.Struct(">II")
_HEAD = len(MAGIC) + _LENGTHS.size
_MALFORMED = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, struct.error)


@dataclass(slots=True)
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

    def coordinates(self) -> dict[str, Any]:
        """Everything but the value, for the handoff's first document."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": _b64(self.key),
            "headers": [[k, _b64(v)] for k, v in self.headers],
            "ts": self.timestamp_ms,
            "value": self.value is not None,
        }

    @classmethod
    def from_coordinates(cls, src: dict[str, Any], value: bytes | None) -> SourceRecord:
        return cls(
            topic=str(src["topic"]),
            partition=int(src["partition"]),
            offset=int(src["offset"]),
            key=_unb64(src.get("key")),
            value=value,
            headers=tuple((str(k), _unb64(v) or b"") for k, v in src.get("headers", ())),
            timestamp_ms=src.get("ts"),
        )


class Handoff:
    """One handed-off notification. ``root`` is what the rule's `when` saw: payload, ``imm`` and ``event``."""

    __slots__ = ("_root", "_root_json", "_where", "notification", "seen", "source")

    def __init__(self, notification: Notification, root: dict[str, Any], seen: float, source: SourceRecord) -> None:
        self.notification = notification
        self.seen = seen  # epoch seconds the routing replica routed it
        self.source = source
        self._root: dict[str, Any] | None = root
        self._root_json = b""
        self._where = ""

    @property
    def root(self) -> dict[str, Any]:
        if self._root is None:
            try:
                root = dict(jsoncodec.loads(self._root_json))
                if "imm" in root and root["imm"] is None:  # written once, as the notification's view
                    root["imm"] = self.notification.view
                self._root = root
            except _MALFORMED as exc:
                # Only a foreign writer can get here (the frame passed Kafka's CRC and its first document
                # parsed): send the alert rather than lose it, with nothing for silences to match.
                log.warning(
                    "%s: the handoff's rule root is not a JSON object (%s); using an empty one", self._where, exc
                )
                self._root = {}
        return self._root

    @property
    def record_time(self) -> float | None:
        ts = self.source.timestamp_ms
        return ts / 1000 if ts is not None else None

    def encode(self, version: int) -> bytes:
        """The record's value in wire format ``version`` (1 for owners of versions before 2)."""
        n, src = self.notification, self.source
        notification = {
            "event_id": n.event_id,
            "event_type": n.event_type,
            "rule": n.rule,
            "channel": n.channel,
            "template": n.template,
            "severity": n.severity,
            "payload": n.payload,
            "summary": n.summary,
        }
        if version == 1:
            coordinates = src.coordinates() | {"value": _b64(src.value)}
            doc = {"n": notification, "root": self.root, "seen": self.seen, "src": coordinates}
            return jsoncodec.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
        head = {"n": notification | {"view": n.view}, "seen": self.seen, "src": src.coordinates()}
        first = jsoncodec.dumps(head, option=orjson.OPT_NON_STR_KEYS)
        root = self._root_json if self._root is None else self._encode_root()
        return b"".join((MAGIC, _LENGTHS.pack(len(first), len(root)), first, root, src.value or b""))

    def _encode_root(self) -> bytes:
        root = self._root
        assert root is not None
        if root.get("imm") is self.notification.view:
            root = {**root, "imm": None}  # in the first document already, as the notification's view
        return jsoncodec.dumps(root, option=orjson.OPT_NON_STR_KEYS)

    @classmethod
    def decode(cls, raw: bytes | None, *, where: str) -> Handoff:
        """Raises DecodeError naming ``where`` for anything that is not a handoff record."""
        raw = raw or b""
        try:
            if not raw.startswith(MAGIC):
                return cls._decode_v1(raw)
            head_size, root_size = _LENGTHS.unpack_from(raw, len(MAGIC))
            root_end = _HEAD + head_size + root_size
            if root_end > len(raw):
                raise ValueError(f"{len(raw)} bytes, the frame says at least {root_end}")
            doc = jsoncodec.loads(raw[_HEAD : _HEAD + head_size])
            src = doc["src"]
            value = raw[root_end:] if src["value"] else None
            handoff = cls(
                _notification(doc["n"], doc["n"]["view"]),
                {},
                float(doc["seen"]),
                SourceRecord.from_coordinates(src, value),
            )
            handoff._root, handoff._root_json, handoff._where = None, raw[_HEAD + head_size : root_end], where
            return handoff
        except _MALFORMED as exc:
            raise DecodeError(
                f"not a notification handoff record ({type(exc).__name__}: {exc})", source=where
            ) from None

    @classmethod
    def _decode_v1(cls, raw: bytes) -> Handoff:
        doc = jsoncodec.loads(raw)
        src, root = doc["src"], dict(doc["root"])
        source = SourceRecord.from_coordinates(src, _unb64(src.get("value")))
        return cls(_notification(doc["n"], root.get("imm")), root, float(doc["seen"]), source)


def _notification(n: dict[str, Any], view: Any) -> Notification:
    return Notification(
        event_id=str(n["event_id"]),
        event_type=str(n["event_type"]),
        rule=str(n["rule"]),
        channel=str(n["channel"]),
        template=str(n["template"]),
        severity=str(n["severity"]),
        payload=_object(n["payload"]),
        summary=str(n.get("summary", "")),
        view=_object(view or {}),
    )


def _object(value: Any) -> dict[str, Any]:
    """A JSON object as parsed (fresh: nothing else holds it, so no copy)."""
    if type(value) is not dict:
        raise TypeError(f"expected an object, not {type(value).__name__}")
    return value


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)
