"""Every seed example decodes in every wire format it can come in; bad input gets a clear DecodeError."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from router.decode import Limits, WireFormat, decode
from router.errors import DecodeError

EVENTS = Path(__file__).parent / "events"
EVENTBRIDGE = sorted((EVENTS / "eventbridge").glob("*.json"))
MNS_CONTENT = sorted(p for p in (EVENTS / "mns").glob("*.json") if not p.name.startswith("envelope-"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _mns(content: dict, type_: str = "imm:Task:MediaConvert") -> dict:
    return {
        "id": "mns-1",
        "source": "acs.imm",
        "type": type_,
        "subject": "",
        "time": "1724133063161",
        "content": json.dumps(content, ensure_ascii=False),
    }


@pytest.mark.parametrize("path", EVENTBRIDGE, ids=lambda p: p.stem)
def test_eventbridge_examples_decode_in_every_wire_format(path: Path) -> None:
    event = _load(path)
    raw = json.dumps(event, ensure_ascii=False).encode()

    structured = decode(raw)
    assert structured.wire_format is WireFormat.CLOUDEVENT
    assert structured.type == event["type"]
    assert structured.id == event["id"]
    assert structured.data == event["data"]
    assert structured.time.tzinfo is not None
    assert structured.envelope["aliyuneventbusname"] == "default"

    headers = [(f"ce_{k}", str(v).encode()) for k, v in event.items() if k != "data"]
    binary = decode(json.dumps(event["data"]).encode(), headers)
    assert binary.wire_format is WireFormat.CLOUDEVENT_BINARY
    assert (binary.type, binary.id, binary.data, binary.time) == (
        event["type"],
        event["id"],
        event["data"],
        structured.time,
    )

    as_string = decode(json.dumps({**event, "data": json.dumps(event["data"])}).encode())
    assert as_string.data == event["data"]

    wrapped = decode(base64.b64encode(raw))
    assert wrapped.base64 and wrapped.data == event["data"] and wrapped.type == event["type"]

    partial = decode(json.dumps(event["data"]).encode())  # EventBridge "partial event": $.data
    assert partial.wire_format is WireFormat.PAYLOAD
    assert partial.data == event["data"]


@pytest.mark.parametrize("path", MNS_CONTENT, ids=lambda p: p.stem)
def test_mns_examples_decode_as_mns_base64_and_bare_payload(path: Path) -> None:
    content = _load(path)
    mns = decode(json.dumps(_mns(content)).encode())
    assert mns.wire_format is WireFormat.MNS
    assert mns.data == content
    assert mns.time == datetime(2024, 8, 20, 5, 51, 3, 161000, tzinfo=UTC)

    wrapped = decode(base64.b64encode(json.dumps(_mns(content)).encode()))
    assert wrapped.base64 and wrapped.wire_format is WireFormat.MNS and wrapped.data == content

    bare = decode(json.dumps(content, ensure_ascii=False).encode())
    assert bare.wire_format is WireFormat.PAYLOAD
    assert bare.id == content.get("RequestId") or bare.id.startswith("sha256:")
    assert bare.type.startswith("imm:")
    assert bare.type != "imm:Unknown"


def test_the_full_mns_message_example_decodes() -> None:
    event = decode((EVENTS / "mns" / "envelope-MediaConvert.json").read_bytes())
    assert event.wire_format is WireFormat.MNS
    assert event.type == "imm:Task:MediaConvert"
    assert event.id == "25E-1uBJUMOshisffTNk8Nr3GIj****"
    assert event.data["TaskId"] == "MediaConvert-db7faf5a-99c5-4afe-8309-d167fe53****"
    assert event.time == datetime.fromtimestamp(1724133063.161, tz=UTC)
    assert event.view["project"] == "test-project"


@pytest.mark.parametrize(
    ("task_type", "expected"),
    [
        ("FaceClustering", "imm:Task:FigureClustering"),
        ("TaskTypeFigureClustering", "imm:Task:FigureClustering"),
        ("FaceClusterMerging", "imm:Task:FigureClustersMerging"),
        ("PointCloudCompress", "imm:Task:PointCloudCompression"),
        ("TaskImageModeration", "imm:Task:ImageModeration"),
        ("MediaConvert", "imm:Task:MediaConvert"),
    ],
)
def test_task_type_names_of_both_documents_map_to_one_event_type(task_type: str, expected: str) -> None:
    assert decode(orjson.dumps({"TaskType": task_type, "TaskId": "t"})).type == expected
    assert decode(orjson.dumps(_mns({"TaskId": "t"}, "imm:Task:" + task_type))).type == expected


def test_bare_payload_ids_and_shapes() -> None:
    assert decode(b'{"RequestId": "r", "TaskId": "t"}').id == "r"
    assert decode(b'{"TaskId": "t"}').id == "t"
    first = decode(b'{"ProjectName": "p", "State": "Failed", "Statistic": {"SubmitFailure": 1}, "Id": "x"}')
    again = decode(b'{"Id": "x", "Statistic": {"SubmitFailure": 1}, "State": "Failed", "ProjectName": "p"}')
    assert first.id == again.id and first.id.startswith("sha256:")
    assert first.type == "imm:Batch:Notification"
    assert decode(b'{"Id": "trigger-1", "Statistic": {}}').type == "imm:Trigger:Notification"
    assert decode(b'{"TaskId": "b", "State": "Running", "Marker": "m"}').type == "imm:Binding:Task"
    assert decode(b'{"Files": [{"URI": "oss://b/k"}], "Success": true}').type == "imm:FileMeta:Index"


def test_times_are_timezone_aware_whatever_the_input() -> None:
    assert decode(b'{"TaskId": "t", "EndTime": "2023-06-21T11:42:21.006729926+08:00"}').time.utcoffset() is not None
    naive = decode(
        b'{"specversion": "1.0", "id": "1", "type": "imm:Task:X", "time": "2024-01-01T00:00:00", "data": {}}'
    )
    assert naive.time == datetime(2024, 1, 1, tzinfo=UTC)
    assert decode(b'{"specversion":"1.0","id":"1","type":"t","time":"garbage","data":{}}').time.tzinfo is not None


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("raw", "headers", "problem"),
    [
        (b'\xff\xfe{"a": 1}', [], "not valid UTF-8"),
        (b'{"a": "\xc3"}', [], "not valid UTF-8"),
        (b"{not json", [], "not valid JSON"),
        (b"", [], "not valid JSON"),
        (None, [], "empty record"),
        (b"[1, 2]", [], "not a JSON object (got array)"),
        (b'"just a string"', [], "not a JSON object (got string)"),
        (b"42", [], "not a JSON object (got number)"),
        (b'{"a": NaN}', [], "not valid JSON"),
        (b'{"a": 1e999}', [], "not valid JSON"),
        (b'{"a": "\\ud800"}', [], "not valid UTF-8"),
        (DEEP, [], "nested deeper than"),
        (b'{"a":' * 100 + b"1" + b"}" * 100, [], "nested deeper than 64"),
        (b'{"type": "imm:Task:X", "source": "acs.imm", "content": "[1]"}', [], "MNS content is not a JSON object"),
        (b'{"type": "imm:Task:X", "source": "acs.imm", "content": "{oops"}', [], "MNS content is not valid JSON"),
        (b'{"type": "imm:Task:X", "source": "acs.imm", "content": ""}', [], "MNS content is empty"),
        (b'{"specversion": "1.0", "type": "t", "data": [1]}', [], "CloudEvent data is not a JSON object"),
        (b'{"specversion": "1.0", "type": "t", "data": "nope"}', [], "data string is not valid JSON"),
        (b"[1]", [("ce_type", b"imm:Task:X"), ("ce_id", b"1")], "binary-mode CloudEvent value is not a JSON"),
        (b"{}", [("ce_type", b"\xff"), ("ce_id", b"1")], "header 'ce_type' is not valid UTF-8"),
    ],
)
def test_bad_input_raises_a_decode_error_naming_input_and_problem(raw, headers, problem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DecodeError) as caught:
        decode(raw, headers, source="topic/3@42")
    message = str(caught.value)
    assert problem in message
    assert message.startswith("topic/3@42: ")
    message.encode("utf-8")  # always printable: no lone surrogates


def test_size_limit_is_configurable() -> None:
    raw = orjson.dumps({"TaskId": "t", "Message": "x" * 2000})
    assert decode(raw, limits=Limits(max_bytes=4096)).id == "t"
    with pytest.raises(DecodeError, match="over the 1024-byte limit"):
        decode(raw, limits=Limits(max_bytes=1024))


def test_str_values_with_lone_surrogates_do_not_crash() -> None:
    with pytest.raises(DecodeError, match="not valid UTF-8"):
        decode('{"TaskId": "\udc80"}')


BIG = 2**64  # beyond what orjson keeps exact


def test_integers_beyond_64_bits_stay_exact_and_do_not_collide(engine) -> None:  # type: ignore[no-untyped-def]
    from router.alerting.handoff import Handoff, SourceRecord

    def failure(ident: int, task: int) -> bytes:
        doc = {"specversion": "1.0", "id": ident, "type": "imm:Task:MediaConvert", "source": "acs.imm"}
        data = {"TaskType": "MediaConvert", "TaskId": task, "Status": "Failed", "Code": "E", "ProjectName": "p"}
        return json.dumps(doc | {"data": data}).encode()

    first, second = decode(failure(BIG + 1, -BIG - 1)), decode(failure(BIG + 2, -BIG - 2))
    assert (first.id, second.id) == (str(BIG + 1), str(BIG + 2))
    assert first.data["TaskId"] == -BIG - 1 and first.view["task_id"] == str(-BIG - 1)
    bare = [decode(json.dumps({"TaskType": "MediaConvert", "Size": BIG + n, "Status": "Failed"})) for n in (1, 2)]
    assert bare[0].id != bare[1].id  # the sha256 of their canonical JSON
    routed = [engine.route(event).notifications for event in (first, second)]
    keys = {n.dedup_key for batch in routed for n in batch}
    assert len(keys) == sum(len(batch) for batch in routed) > 2
    kafka = next(n for n in routed[0] if n.channel == "alerts-topic")
    assert json.loads(kafka.payload["value"])["event"]["id"] == str(BIG + 1)
    assert json.loads(kafka.payload["value"])["imm"]["task_id"] == str(-BIG - 1)
    source = SourceRecord("t", 0, 1, None, failure(BIG + 1, -BIG - 1), ())
    result = engine.route(first)
    for version in (1, 2):
        again = Handoff.decode(Handoff(kafka, result.root, 0.0, source).encode(version), where="t")
        assert again.root["event"]["id"] == str(BIG + 1) and again.root["TaskId"] == -BIG - 1


def test_a_utf8_bom_is_accepted_and_stripped() -> None:
    from router.decode import iter_events

    event = _load(EVENTBRIDGE[0])
    raw = json.dumps(event, ensure_ascii=False).encode()
    bom = b"\xef\xbb\xbf"
    expected = decode(raw)
    for variant in (bom + raw, base64.b64encode(bom + raw)):
        assert decode(variant).data == expected.data
    (from_file,) = iter_events("with-bom.json", bom + raw)
    assert not isinstance(from_file, DecodeError) and from_file.data == expected.data
    lines = list(iter_events("lines.jsonl", bom + raw + b"\n" + raw))
    assert [getattr(e, "data", e) for e in lines] == [expected.data] * 2
    mns = _mns({"TaskType": "MediaConvert", "Status": "Failed"})
    mns["content"] = "\ufeff" + mns["content"]
    assert decode(json.dumps(mns).encode()).data["Status"] == "Failed"


def test_files_and_records_are_held_to_one_size_rule() -> None:
    from router.decode import iter_events

    limits = Limits(max_bytes=2_000)
    event = _load(EVENTBRIDGE[0])
    event["data"]["Padding"] = "p" * 2_500
    big = json.dumps(event).encode()
    small = json.dumps(_load(EVENTBRIDGE[0])).encode()
    with pytest.raises(DecodeError, match="over the 2000-byte limit"):
        decode(big, limits=limits)
    for name, raw, source in (
        ("one.json", big, "one.json"),
        ("many.json", b"[" + small + b"," + big + b"]", "many.json[1]"),
        ("lines.jsonl", small + b"\n" + big, "lines.jsonl:2"),
    ):
        results = list(iter_events(name, raw, limits))
        errors = [r for r in results if isinstance(r, DecodeError)]
        assert [e.source for e in errors] == [source] and "over the 2000-byte limit" in str(errors[0])
        assert len(results) - len(errors) == (0 if name == "one.json" else 1)
