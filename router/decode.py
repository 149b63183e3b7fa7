"""Raw records (value bytes + headers) → one normalized IMM event, whatever wire format they came in.

Auto-detected formats:
- ``cloudevent``: EventBridge CloudEvent JSON (Kafka structured mode); ``data`` an object, a JSON
  string holding one, or ``data_base64``;
- ``cloudevent-binary``: CloudEvents Kafka binary mode: ``ce_*`` headers, the value is the payload;
- ``mns``: MNS notification whose ``content`` is an escaped JSON string and ``time`` epoch ms;
- ``payload``: a bare IMM payload (EventBridge "partial event" ``$.data``).
Any of them may arrive base64-encoded as a whole (MNS publishers often do that).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from router import jsoncodec
from router.errors import DecodeError
from router.imm import Facts, build_view, canonical_type, infer_type, parse_time

Headers = Iterable[tuple[str, bytes | None]]


class WireFormat(StrEnum):
    CLOUDEVENT = "cloudevent"
    CLOUDEVENT_BINARY = "cloudevent-binary"
    MNS = "mns"
    PAYLOAD = "payload"


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, three times the cost,
# and one is built per record. Nothing changes an event once decoded (``replace`` makes another).
@dataclass(slots=True)
class Event:
    id: str
    type: str
    source: str
    subject: str
    time: datetime
    data: dict[str, Any]
    envelope: dict[str, Any]
    wire_format: WireFormat
    base64: bool = False
    # The normalized view rules and templates see as ``imm`` (see router/imm.py), built when first read:
    # most events meet no rule that reads it whole (see ``view_of``).
    _view: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # What a partial view worked out, kept for the whole view if the event matches a rule.
    _facts: Facts | None = field(default=None, repr=False, compare=False)

    @property
    def view(self) -> dict[str, Any]:
        if self._view is None:
            self._view = build_view(self.data, self.envelope, self.type, facts=self._facts)
            self._facts = None
        return self._view

    def view_of(self, keys: frozenset[str] | None) -> dict[str, Any]:
        """The view with only ``keys`` of it (None: all), for rules that read nothing else of it."""
        if keys is None or self._view is not None:
            return self.view
        if self._facts is None:
            self._facts = Facts(self.data, self.envelope, self.type)
        return build_view(self.data, self.envelope, self.type, keys, self._facts)

    def event_doc(self, keys: frozenset[str] | None = None) -> dict[str, Any]:
        """What rules and templates see as ``event``: the envelope plus normalized attributes; with
        ``keys``, only those of them."""
        if keys is None:
            return {**self.envelope, **{key: attribute(self) for key, attribute in _ATTRIBUTES.items()}}
        return {
            key: attribute(self) if attribute is not None else self.envelope[key]
            for key in keys
            if (attribute := _ATTRIBUTES.get(key)) is not None or key in self.envelope
        }


# ``event`` keys that are the router's normalized attributes, not the envelope's own.
_ATTRIBUTES: dict[str, Callable[[Event], str]] = {
    "id": lambda e: e.id,
    "type": lambda e: e.type,
    "source": lambda e: e.source,
    "subject": lambda e: e.subject,
    "time": lambda e: e.time.isoformat(),
    "wire_format": lambda e: str(e.wire_format),
}


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 1_048_576
    max_depth: int = 64


DEFAULT_LIMITS = Limits()
# Editors on Windows start UTF-8 files with one; it is no part of the JSON.
BOM = b"\xef\xbb\xbf"


def _named(exc: Exception, source: str) -> DecodeError:
    """What went wrong decoding ``source`` as a DecodeError naming it (anything else is a bug)."""
    if isinstance(exc, DecodeError):
        return DecodeError(exc.reason, source=source)
    if isinstance(exc, RecursionError):
        return DecodeError("nested too deeply", source=source)
    return DecodeError(f"malformed event: {type(exc).__name__}: {_safe(str(exc))}", source=source)


# What decoding can raise, all of them made into a DecodeError by _named.
_DECODE_ERRORS = (DecodeError, RecursionError, ValueError, TypeError, OverflowError)


def decode(
    value: bytes | str | None, headers: Headers = (), *, limits: Limits = DEFAULT_LIMITS, source: str = "record"
) -> Event:
    """Decode one record. Raises DecodeError naming ``source`` and the problem; never anything else."""
    try:  # not a context manager: this runs once per record, and entering one costs more than a decode step
        return _decode(value, headers, limits)
    except _DECODE_ERRORS as exc:
        raise _named(exc, source) from None


def decode_object(
    obj: Any, *, limits: Limits = DEFAULT_LIMITS, source: str = "record", size: int | None = None
) -> Event:
    """Decode an already parsed JSON value (from a file holding an array or one event). ``size``: its bytes
    as read, held to ``limits.max_bytes`` like a record's (default: the size of its compact JSON)."""
    try:
        if isinstance(obj, str):
            return _decode(obj.encode("utf-8", errors="surrogatepass"), (), limits)
        _check_depth(obj, limits.max_depth)
        _check_size(len(jsoncodec.dumps(obj)) if size is None else size, limits)
        return _from_object(obj, base64_wrapped=False)
    except _DECODE_ERRORS as exc:
        raise _named(exc, source) from None


def iter_events(name: str, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Iterator[Event | DecodeError]:
    """The events of an input file: one JSON event, a JSON array of events, or JSON lines (each may be
    a base64 body). Inputs that fail come back as DecodeErrors naming ``name`` and the line or index.
    Each event is held to ``limits`` as the service holds a record."""
    raw = raw.removeprefix(BOM)
    try:
        whole = jsoncodec.loads(raw)
    except orjson.JSONDecodeError:
        lines = raw.splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip():
                source = f"{name}:{number}" if len(lines) > 1 else name
                try:
                    yield decode(line, limits=limits, source=source)
                except DecodeError as exc:
                    yield exc
        return
    items = whole if isinstance(whole, list) else [whole]
    for index, item in enumerate(items):
        source = f"{name}[{index}]" if isinstance(whole, list) else name
        try:
            yield decode_object(item, limits=limits, source=source, size=None if isinstance(whole, list) else len(raw))
        except DecodeError as exc:
            yield exc


def _decode(value: bytes | str | None, headers: Headers, limits: Limits) -> Event:
    if value is None:
        raise DecodeError("empty record (no value)")
    raw = value.encode("utf-8", errors="surrogatepass") if isinstance(value, str) else value
    _check_size(len(raw), limits)
    raw = raw.removeprefix(BOM)
    ce_headers = _cloudevent_headers(headers)
    if ce_headers is not None:
        payload = _parse_json(raw, limits, what="value")
        if not isinstance(payload, dict):
            raise DecodeError(f"binary-mode CloudEvent value is not a JSON object (got {_kind(payload)})")
        return _from_cloudevent({**ce_headers, "data": payload}, WireFormat.CLOUDEVENT_BINARY, False)
    stripped = raw.lstrip()
    wrapped = False
    if stripped[:1] not in (b"{", b"[", b'"') and stripped:
        # Not JSON-looking: MNS publishers often base64-encode the whole body.
        try:
            raw = base64.b64decode(stripped, validate=True)
            wrapped = True
        except (binascii.Error, ValueError):
            pass
    obj = _parse_json(raw, limits, what="value")
    return _from_object(obj, base64_wrapped=wrapped)


def _from_object(obj: Any, *, base64_wrapped: bool) -> Event:
    if not isinstance(obj, dict):
        raise DecodeError(f"event is not a JSON object (got {_kind(obj)})")
    if isinstance(obj.get("content"), str | dict) and "data" not in obj and ("type" in obj or "source" in obj):
        return _from_mns(obj, base64_wrapped)
    if "specversion" in obj or ("data" in obj and "type" in obj) or "data_base64" in obj:
        return _from_cloudevent(obj, WireFormat.CLOUDEVENT, base64_wrapped)
    return _from_payload(obj, base64_wrapped)


def _from_cloudevent(obj: dict[str, Any], fmt: WireFormat, wrapped: bool) -> Event:
    if "data_base64" in obj and "data" not in obj:
        try:
            data = _parse_json(
                base64.b64decode(str(obj["data_base64"]), validate=True), DEFAULT_LIMITS, what="data_base64"
            )
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"data_base64 is not valid base64: {exc}") from None
    else:
        data = obj.get("data")
    if isinstance(data, str):
        data = _parse_json(data.encode("utf-8", errors="surrogatepass"), DEFAULT_LIMITS, what="data string")
    if not isinstance(data, dict):
        raise DecodeError(f"CloudEvent data is not a JSON object (got {_kind(data)})")
    envelope = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
    etype = _text(envelope.get("type")) or infer_type(data)
    return _event(
        event_id=_text(envelope.get("id")) or _payload_id(data),
        etype=etype,
        envelope=envelope,
        data=data,
        time=parse_time(envelope.get("time")),
        fmt=fmt,
        wrapped=wrapped,
    )


def _from_mns(obj: dict[str, Any], wrapped: bool) -> Event:
    content = obj["content"]
    if isinstance(content, str):
        if not content.strip():
            raise DecodeError("MNS content is empty")
        content = _parse_json(content.encode("utf-8", errors="surrogatepass"), DEFAULT_LIMITS, what="MNS content")
    if not isinstance(content, dict):
        raise DecodeError(f"MNS content is not a JSON object (got {_kind(content)})")
    envelope = {k: v for k, v in obj.items() if k != "content"}
    etype = _text(envelope.get("type"))
    if not etype or etype.endswith("*"):
        etype = infer_type(content)
    return _event(
        event_id=_text(envelope.get("id")) or _payload_id(content),
        etype=etype,
        envelope=envelope,
        data=content,
        time=_epoch_ms(envelope.get("time")) or parse_time(None),
        fmt=WireFormat.MNS,
        wrapped=wrapped,
    )


def _from_payload(data: dict[str, Any], wrapped: bool) -> Event:
    payload_time = next((data[k] for k in ("EndTime", "UpdateTime", "StartTime", "CreateTime") if data.get(k)), None)
    return _event(
        event_id=_payload_id(data),
        etype=infer_type(data),
        envelope={},
        data=data,
        time=parse_time(payload_time),
        fmt=WireFormat.PAYLOAD,
        wrapped=wrapped,
    )


def _event(
    *,
    event_id: str,
    etype: str,
    envelope: dict[str, Any],
    data: dict[str, Any],
    time: datetime,
    fmt: WireFormat,
    wrapped: bool,
) -> Event:
    etype = canonical_type(etype)
    return Event(
        id=event_id,
        type=etype,
        source=_text(envelope.get("source")) or "acs.imm",
        subject=_text(envelope.get("subject")),
        time=time,
        data=data,
        envelope=envelope,
        wire_format=fmt,
        base64=wrapped,
    )


def _cloudevent_headers(headers: Headers) -> dict[str, Any] | None:
    attrs: dict[str, Any] = {}
    for key, val in headers:
        lower = key.lower()
        if lower.startswith("ce_") or lower.startswith("ce-"):
            try:
                attrs[lower[3:]] = (val or b"").decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"header {key!r} is not valid UTF-8") from None
    if "type" not in attrs and "id" not in attrs:
        return None
    return attrs


def _check_size(size: int, limits: Limits) -> None:
    if size > limits.max_bytes:
        raise DecodeError(f"record is {size} bytes, over the {limits.max_bytes}-byte limit (max_event_bytes)")


def _parse_json(raw: bytes, limits: Limits, *, what: str) -> Any:
    raw = raw.removeprefix(BOM)
    try:
        obj = jsoncodec.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "utf-8" in msg.lower() or "surrogate" in msg.lower():
            raise DecodeError(f"{what} is not valid UTF-8 text ({_safe(msg)})") from None
        if "depth" in msg.lower() or "recursion" in msg.lower():
            raise DecodeError(f"{what} is nested deeper than {limits.max_depth} levels") from None
        raise DecodeError(f"{what} is not valid JSON: {_safe(msg)}") from None
    # Nesting can't exceed the number of brackets: skip the walk for ordinary events.
    if raw.count(b"{") + raw.count(b"[") > limits.max_depth:
        _check_depth(obj, limits.max_depth)
    return obj


def _check_depth(obj: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise DecodeError(f"event is nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))


def _payload_id(data: dict[str, Any]) -> str:
    for key in ("RequestId", "TaskId"):
        value = _text(data.get(key))
        if value:
            return value
    return "sha256:" + hashlib.sha256(jsoncodec.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _epoch_ms(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(str(value)) / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _safe(text: str) -> str:
    """Error text that can always be printed: no lone surrogates, bounded length."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")[:300]
