"""The handoff record between a routing replica and a channel's owner: every seed notification comes
back exactly as it left, the rule root is read only when asked for, records a previous version wrote
are still read, and anything else is a DecodeError naming the record."""

from __future__ import annotations

import base64
import json
import logging
import struct

import pytest

from router.alerting.handoff import MAGIC, Handoff, SourceRecord
from router.decode import decode
from router.embedded.demo import demo_records
from router.engine import Engine
from router.errors import DecodeError


def _handoffs(engine: Engine) -> list[Handoff]:
    out = []
    for offset, (_, value, headers) in enumerate(demo_records()[:-1]):  # the last is the poison record
        result = engine.route(decode(value, headers))
        source = SourceRecord("imm-events", 3, offset, b"k" if offset % 2 else None, value, tuple(headers), 1_700_000)
        out += [Handoff(n, result.root, 1_700_000.5, source) for n in result.notifications]
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_every_seed_notification_comes_back_as_it_left(engine: Engine, version: int) -> None:
    handoffs = _handoffs(engine)
    assert len({h.notification.channel for h in handoffs}) >= 3
    for sent in handoffs:
        raw = sent.encode(version)
        if version == 2:
            assert raw.count(b'"failure_reasons":') == 1  # the view travels once, not also in the root
        got = Handoff.decode(raw, where="notifications/0@7")
        assert got.notification == sent.notification
        assert got.root == sent.root
        assert (got.seen, got.record_time) == (1_700_000.5, 1_700.0)
        assert got.source == sent.source


@pytest.mark.parametrize("value", [None, b"", b"\x00H2{}"])
def test_a_source_value_that_is_absent_empty_or_looks_like_a_frame_is_kept(engine: Engine, value: bytes | None) -> None:
    sent = _handoffs(engine)[0]
    sent.source.value = value
    got = Handoff.decode(sent.encode(2), where="t")
    assert got.source.value == value
    assert got.root == sent.root


def test_an_unreadable_rule_root_does_not_lose_the_alert(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    sent = _handoffs(engine)[0]
    raw = bytearray(sent.encode(2))
    head = struct.unpack_from(">II", raw, len(MAGIC))[0]
    raw[len(MAGIC) + 8 + head] = ord("[")  # the root's opening brace
    got = Handoff.decode(bytes(raw), where="notifications/2@40")  # the root is not parsed yet
    assert got.notification == sent.notification
    with caplog.at_level(logging.WARNING):
        assert got.root == {}
    assert "notifications/2@40: the handoff's rule root is not a JSON object" in caplog.text


def test_version_1_is_what_the_previous_version_wrote_and_reads(engine: Engine) -> None:
    """The default format during the upgrade (kafka.handoff_format 1): owners still on the previous
    version must read what this one writes, and this one what they wrote."""
    sent = _handoffs(engine)[1]
    n, src = sent.notification, sent.source
    version_1 = {
        "n": {k: getattr(n, k) for k in ("event_id", "event_type", "rule", "channel", "template", "severity")}
        | {"payload": n.payload, "summary": n.summary},
        "root": sent.root,
        "seen": sent.seen,
        "src": {
            "topic": src.topic,
            "partition": src.partition,
            "offset": src.offset,
            "key": base64.b64encode(src.key or b"").decode() if src.key is not None else None,
            "value": base64.b64encode(src.value or b"").decode(),
            "headers": [[k, base64.b64encode(v).decode()] for k, v in src.headers],
            "ts": src.timestamp_ms,
        },
    }
    got = Handoff.decode(json.dumps(version_1).encode(), where="t")
    assert got.notification == sent.notification  # its view is the root's imm
    assert got.root == sent.root and got.source == sent.source and got.seen == sent.seen
    assert json.loads(sent.encode(1)) == version_1


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"not json",
        b"{}",
        b'{"n": {}, "root": {}, "seen": 1, "src": {}}',
        MAGIC,
        MAGIC + struct.pack(">II", 10, 10) + b"{}",
        MAGIC + struct.pack(">II", 2, 2) + b"[]{}",
        MAGIC + struct.pack(">II", 8, 2) + b"not json{}",
    ],
)
def test_anything_else_is_a_decode_error_naming_the_record(raw: bytes | None) -> None:
    with pytest.raises(DecodeError, match=r"notifications/1@9.*not a notification handoff record"):
        Handoff.decode(raw, where="notifications/1@9")


def test_a_payload_that_is_not_an_object_is_a_decode_error(engine: Engine) -> None:
    sent = _handoffs(engine)[0]
    raw = sent.encode(2)
    head_size, root_size = struct.unpack_from(">II", raw, len(MAGIC))
    head = json.loads(raw[len(MAGIC) + 8 : len(MAGIC) + 8 + head_size])
    head["n"]["payload"] = ["a list"]
    body = json.dumps(head).encode()
    rest = raw[len(MAGIC) + 8 + head_size :]
    with pytest.raises(DecodeError, match="expected an object, not list"):
        Handoff.decode(MAGIC + struct.pack(">II", len(body), root_size) + body + rest, where="t")
