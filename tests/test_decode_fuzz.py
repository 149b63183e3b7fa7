"""Property-based fuzz of the decoder (hypothesis): whatever bytes and headers arrive, ``decode`` returns an
Event or raises a DecodeError naming the input, never anything else and never slowly (2 s of CPU); and
whatever it returns, the shipped rules and templates route without an error.

A few thousand cases run with the suite. A longer run (the review that filed issue 11 ran 500,000):
``IMM_FUZZ_EXAMPLES=200000 .venv/bin/pytest -q tests/test_decode_fuzz.py`` (examples per test).
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import jsoncodec
from router.decode import Event, Limits, decode, iter_events
from router.engine import Engine
from tests.test_delivery_support import ROOT, make_engine

EXAMPLES = int(os.environ.get("IMM_FUZZ_EXAMPLES", "1000"))
LIMITS = Limits(max_bytes=64 * 1024, max_depth=16)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # hangs are asserted below in CPU time: wall time on a shared machine is no measure
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_CPU_SECONDS = 2.0  # per case; a wait without CPU (a deadlock) meets pytest's timeout instead

IMM_KEYS = [
    "TaskType", "TaskId", "RequestId", "Status", "State", "Success", "Code", "Message", "Error", "ProjectName",
    "Project", "DatasetName", "URI", "Files", "Targets", "Sources", "Statistic", "StartTime", "EndTime",
    "CreateTime", "UpdateTime", "Suggestion", "Categories", "Frames", "Id", "Marker", "UserData", "EventSourceId",
]  # fmt: skip
ENVELOPE_KEYS = ["id", "type", "source", "subject", "time", "specversion", "aliyunregionid", "datacontenttype"]
EVENT_TYPES = ["imm:Task:MediaConvert", "imm:Task:ImageModeration", "imm:Batch:Notification", "imm:FileMeta:Index", ""]

# Values that have broken things before: edge years, huge integers, markup, an OSS URI.
SPECIAL = [
    "Failed", "Succeeded", "block", "9999-12-31T23:59:59", "0001-01-01T00:00:00+14:00", "oss://b/k", "200",
    "javascript:x", "a\r\nX-Injected: 1", "[x](https://evil.example) @所有人 `", 2**64 + 1, -(2**64) - 1,
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(SPECIAL)
)
values = st.sampled_from(SPECIAL) | st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SEEDS = [
    event.data
    for path in sorted((ROOT / "tests" / "events").rglob("*.json"))
    for event in iter_events(path.name, path.read_bytes())
    if isinstance(event, Event)
]


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A real IMM payload (tests/events) with some fields dropped and some set to arbitrary values, or an
    arbitrary object."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.dictionaries(st.sampled_from(IMM_KEYS) | st.text(max_size=8), values, max_size=8))
    data = dict(draw(st.sampled_from(SEEDS)))
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=3)) if data else []:
        data.pop(key, None)
    data |= draw(st.dictionaries(st.sampled_from(IMM_KEYS), values, max_size=4))
    return data


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """An IMM payload in one of the wire formats (or none), with arbitrary values where fields go."""
    data = draw(payloads())
    envelope = draw(st.dictionaries(st.sampled_from(ENVELOPE_KEYS), values, max_size=6))
    envelope["type"] = draw(st.sampled_from(EVENT_TYPES) | values)
    shape = draw(st.sampled_from(["cloudevent", "cloudevent-string", "data_base64", "mns", "mns-object", "bare"]))
    if shape == "bare":
        return data
    if shape == "cloudevent":
        return {**envelope, "specversion": "1.0", "data": data}
    if shape == "cloudevent-string":
        return {**envelope, "data": json.dumps(data)}
    if shape == "data_base64":
        return {**envelope, "data_base64": base64.b64encode(json.dumps(data).encode()).decode()}
    return {**envelope, "content": data if shape == "mns-object" else json.dumps(data)}


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """A record value: a document as JSON, maybe base64-wrapped, BOM-prefixed, cut short or corrupted."""
    raw = json.dumps(draw(documents()), ensure_ascii=draw(st.booleans())).encode()
    if draw(st.booleans()):
        raw = base64.b64encode(raw)
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    mutation = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert"]))
    if mutation == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif mutation == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    elif mutation == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8)) + raw[at:]
    return raw


headers = st.lists(
    st.tuples(
        st.sampled_from(["ce_type", "ce_id", "ce_source", "ce-time", "content-type", "x"]), st.binary(max_size=20)
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The shipped rules and templates, their channels pointing nowhere (nothing is sent)."""
    channels = {
        "oncall-dingtalk": {"type": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=T"},
        "ops-email": {"type": "email", "host": "smtp.example.com", "from": "a@example.com", "to": ["b@example.com"]},
        "alerts-topic": {"type": "kafka", "topic": "alerts"},
    }
    return make_engine(
        tmp_path_factory.mktemp("fuzz"), channels, rules_dir=str(ROOT / "rules"), timezone="Asia/Shanghai"
    )


def holds(engine: Engine, raw: bytes, record_headers: list[tuple[str, bytes]]) -> None:
    started = time.process_time()
    results = []
    try:
        results.append(decode(raw, record_headers, limits=LIMITS, source="topic/0@1"))
    except Exception as exc:  # the property: a DecodeError naming the input, nothing else
        assert type(exc).__name__ == "DecodeError" and str(exc).startswith("topic/0@1: "), repr(exc)
    results += [item for item in iter_events("file.json", raw, LIMITS) if isinstance(item, Event)]
    for event in results:
        routed = engine.route(event)
        assert not routed.failures, routed.failures
        jsoncodec.dumps(event.event_doc(), default=str)
    spent = time.process_time() - started
    assert spent < MAX_CPU_SECONDS, f"{spent:.1f}s of CPU for {raw[:200]!r}"


@FUZZ
@given(raw=records(), record_headers=headers)
def test_wire_formats_with_arbitrary_values_and_corruption(engine: Engine, raw: bytes, record_headers: Any) -> None:
    holds(engine, raw, record_headers)


@FUZZ
@given(raw=st.binary(max_size=300), record_headers=headers)
def test_arbitrary_bytes(engine: Engine, raw: bytes, record_headers: Any) -> None:
    holds(engine, raw, record_headers)


@FUZZ
@given(doc=documents(), depth=st.integers(0, 40))
def test_nesting_and_binary_mode(engine: Engine, doc: Any, depth: int) -> None:
    nested: Any = doc
    for _ in range(depth):
        nested = {"data": nested} if depth % 2 else [nested]
    holds(engine, json.dumps(nested).encode(), [])
    data = doc.get("data", doc) if isinstance(doc, dict) else doc
    holds(engine, json.dumps(data).encode(), [("ce_type", b"imm:Task:MediaConvert"), ("ce_id", b"1")])
