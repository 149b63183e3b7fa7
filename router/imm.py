"""One normalized view of IMM payloads, whose fields differ across event types.

Rules reach it as ``imm`` (``imm.outcome == 'failed'``) and templates as ``{{ imm.project }}``.
Every key is always present (``None`` / ``[]`` when the payload lacks it). See README "The imm view".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

# Event types as EventBridge names them; the MNS document names some tasks differently.
TASK_ALIASES = {
    "FaceClustering": "FigureClustering",
    "FaceClusterMerging": "FigureClustersMerging",
    "PointCloudCompress": "PointCloudCompression",
    "CompressPointCloud": "PointCloudCompression",
}
KNOWN_TASKS = frozenset({
    "FigureClustering", "FigureClustersMerging", "StoryCreation", "VideoLabelClassification",
    "ImageModeration", "MediaConvert", "OfficeConversion", "VideoModeration", "ImageSplicing",
    "PointCloudCompression", "ImageToPDF", "FileCompression", "LocationDateClustering",
    "ArchiveFileInspection", "FileUncompression", "SimilarImageClustering", "AsyncTask", "SyncTask",
    "FacesSearching", "LiveTranscoding", "DecodeBlindWatermark",
})  # fmt: skip
MODERATION_TASKS = frozenset({"ImageModeration", "VideoModeration"})
# The events POST /ingest/alertmanager makes of a Prometheus Alertmanager webhook: one per alert, by its status.
ALERTMANAGER_TYPES = frozenset({"alertmanager:firing", "alertmanager:resolved"})
# What such an event's data carries under ``alertmanager``: the webhook notification around the alert,
# each field there (these defaults when Alertmanager leaves one out).
ALERT_CONTEXT: dict[str, Any] = {
    "receiver": "",
    "status": "",
    "externalURL": "",
    "groupKey": "",
    "groupLabels": {},
    "commonLabels": {},
    "commonAnnotations": {},
    "truncatedAlerts": 0,
}
# Every event type IMM sends (its EventBridge documentation), as the decoder names them; imm:Unknown is
# what a bare payload of no recognisable shape becomes; and the Alertmanager alerts.
KNOWN_EVENT_TYPES = ALERTMANAGER_TYPES | frozenset(
    {f"imm:Task:{task}" for task in KNOWN_TASKS}
    | {f"imm:FileMeta:{kind}" for kind in ("Index", "Delete", "BatchIndex", "BatchDelete", "BatchUpdate")}
    | {f"imm:Engine:{kind}" for kind in ("Exif", "Mime", "OSSMeta", "Tag")}
    | {f"imm:ActionTrail:{kind}" for kind in ("ApiCall", "AliyunServiceEvent", "ConsoleOperation", "ConsoleSignin")}
    | {"imm:ActionTrail:ConsoleSignout", "imm:Binding:Task", "imm:Batch:Notification", "imm:Trigger:Notification"}
    | {"imm:Unknown"}
)
# What ``event`` has besides the payload: the CloudEvent envelope IMM events carry, and the router's own
# normalized attributes (wire_format). MNS envelopes are a subset.
ENVELOPE_KEYS = frozenset({
    "id", "source", "specversion", "type", "subject", "time", "datacontenttype", "dataschema", "wire_format",
    "aliyunaccountid", "aliyunpublishtime", "aliyunoriginalaccountid", "aliyuneventbusname", "aliyunregionid",
    "aliyunpublishaddr",
})  # fmt: skip
FAILED = frozenset({"failed", "failure", "fail", "error"})
RUNNING = frozenset({"running", "processing", "pending", "queued", "submitted", "created"})
SUCCEEDED = frozenset({"success", "succeeded", "succeed", "successful", "finished", "ok", "completed"})
_FILE_ERROR_CODE = re.compile(r"^\[([A-Za-z0-9_.]+)\]")
_REGION = re.compile(r"^acs[.:]imm:([a-z0-9-]+):")


@functools.lru_cache(maxsize=1024)  # one call per event, over a handful of names
def canonical_task(task_type: str) -> str:
    """``TaskTypeFigureClustering`` / ``TaskImageModeration`` / ``FaceClustering`` → EventBridge's name."""
    name = task_type
    for prefix in ("TaskType", "Task"):
        if name.startswith(prefix) and name[len(prefix) :] in KNOWN_TASKS | TASK_ALIASES.keys():
            name = name[len(prefix) :]
            break
    return TASK_ALIASES.get(name, name)


def canonical_type(event_type: str) -> str:
    if event_type.startswith("imm:Task:"):
        return "imm:Task:" + canonical_task(event_type[len("imm:Task:") :])
    return event_type


def infer_type(data: dict[str, Any]) -> str:
    """The event type of a bare payload, from TaskType or its shape; ``imm:Unknown`` when neither tells."""
    task_type = data.get("TaskType")
    if isinstance(task_type, str) and task_type:
        return "imm:Task:" + canonical_task(task_type)
    if isinstance(data.get("Statistic"), dict):
        ident = str(data.get("Id", ""))
        return "imm:Trigger:Notification" if ident.startswith("trigger") else "imm:Batch:Notification"
    if "Marker" in data or ("State" in data and "TaskId" in data):
        return "imm:Binding:Task"
    if isinstance(data.get("Files"), list):
        return "imm:FileMeta:Index" if len(data["Files"]) <= 1 else "imm:FileMeta:BatchIndex"
    return "imm:Unknown"


def parse_time(value: Any) -> datetime:
    """RFC 3339 (nanoseconds and ``Z`` too) → aware datetime; naive times are UTC; unparseable → now."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _bad_code(code: Any) -> bool:
    text = _str(code)
    return text is not None and text != "200"


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def failure_reasons(data: dict[str, Any], bad_files: int, bad_targets: int) -> list[str]:
    """Why a payload counts as failed; empty when it does not. ``bad_files`` / ``bad_targets``: how many
    of its Files have an Error and of its Targets a Code other than "" or "200"."""
    reasons = []
    status, state = _str(data.get("Status")), _str(data.get("State"))
    if status and status.lower() in FAILED:
        reasons.append(f"Status={status}")
    success = data.get("Success")
    if success is False or (isinstance(success, str) and success.lower() == "false"):
        reasons.append("Success=false")
    if _bad_code(data.get("Code")):
        reasons.append(f"Code={data['Code']}")
    if state and state.lower() in FAILED:
        reasons.append(f"State={state}")
    if _str(data.get("Error")):
        reasons.append("Error set")
    statistic = data.get("Statistic")
    if isinstance(statistic, dict):
        failures = statistic.get("SubmitFailure")
        if isinstance(failures, int | float) and not isinstance(failures, bool) and failures > 0:
            reasons.append(f"SubmitFailure={failures}")
    if bad_files:
        reasons.append(f"{bad_files} file error(s)")
    if bad_targets:
        reasons.append(f"{bad_targets} target error(s)")
    return reasons


def outcome(data: dict[str, Any], reasons: list[str]) -> str:
    if reasons:
        return "failed"
    status = (_str(data.get("Status")) or _str(data.get("State")) or "").lower()
    if status in RUNNING:
        return "running"
    if status in SUCCEEDED or data.get("Success") is True:
        return "succeeded"
    return "unknown"


def _error(
    data: dict[str, Any], files: list[dict[str, Any]], targets: list[dict[str, Any]]
) -> tuple[str | None, str | None]:
    """The error code and message of a failed payload; ``files`` / ``targets``: those that failed."""
    code = _str(data.get("Code")) if _bad_code(data.get("Code")) else None
    if code is None and targets:
        code = _str(targets[0].get("Code"))
    if code is None and files:
        error = str(files[0]["Error"])
        match = _FILE_ERROR_CODE.match(error)
        code = match.group(1) if match else (error if " " not in error else None)
    message = _str(data.get("Message"))
    if message is not None and message.lower() in SUCCEEDED:
        message = None
    message = message or _str(data.get("Error"))
    if message is None and files:
        message = _str(files[0].get("Error"))
    if message is None and targets:
        message = _str(targets[0].get("Message"))
    return code, message


def _uris(data: dict[str, Any], files: list[dict[str, Any]], targets: list[dict[str, Any]]) -> list[str]:
    found = [data.get("URI")]
    for items in (files, _dicts(data.get("Sources")), targets):
        found.extend(item.get("URI") for item in items)
    return list(dict.fromkeys(u for u in found if isinstance(u, str) and u))


T = TypeVar("T")


class _once(Generic[T]):  # a decorator, named like one
    """functools.cached_property without its lock (Python 3.11 takes one on every first read): the
    value is stored in the instance, so later reads never come back here."""

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.name = compute.__name__

    def __get__(self, instance: Any, owner: type | None = None) -> T:
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


class _Failure(NamedTuple):
    files: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    bad_files: list[dict[str, Any]]  # those with an Error
    bad_targets: list[dict[str, Any]]  # those with a Code other than "" or "200"
    reasons: list[str]
    outcome: str


class Facts:
    """What several view keys of one payload read (its files, failure reasons, times…), each worked out
    when a key first needs it: a rule usually reads one or two keys of the view, never all."""

    def __init__(self, data: dict[str, Any], envelope: dict[str, Any], event_type: str) -> None:
        self.data, self.envelope, self.event_type = data, envelope, event_type

    @_once
    def failure(self) -> _Failure:
        data = self.data
        files, targets = _dicts(data.get("Files")), _dicts(data.get("Targets"))
        bad_files = [f for f in files if _str(f.get("Error"))]
        bad_targets = [t for t in targets if _bad_code(t.get("Code"))]
        reasons = failure_reasons(data, len(bad_files), len(bad_targets))
        return _Failure(files, targets, bad_files, bad_targets, reasons, outcome(data, reasons))

    @_once
    def times(self) -> tuple[datetime | None, datetime | None]:
        data = self.data
        start = _iso(data.get("StartTime") or data.get("CreateTime"))
        return start, _iso(data.get("EndTime") or data.get("UpdateTime"))

    @_once
    def task_type(self) -> str | None:
        raw = _str(self.data.get("TaskType"))
        if raw:
            return canonical_task(raw)
        return self.event_type.split(":")[-1] if self.event_type.startswith("imm:Task:") else None

    @_once
    def error(self) -> tuple[str | None, str | None]:
        failure = self.failure
        return _error(self.data, failure.bad_files, failure.bad_targets) if failure.reasons else (None, None)

    @_once
    def uris(self) -> list[str]:
        return _uris(self.data, self.failure.files, self.failure.targets)

    def moderation(self) -> dict[str, Any] | None:
        data = self.data
        suggestion = _str(data.get("Suggestion"))
        if suggestion is None and self.task_type not in MODERATION_TASKS:
            return None
        categories, frames = data.get("Categories"), data.get("Frames")
        return {
            "suggestion": suggestion.lower() if suggestion else None,
            "categories": [c for c in categories if isinstance(c, str)] if isinstance(categories, list) else [],
            "block_frames": _dicts(frames.get("BlockFrames")) if isinstance(frames, dict) else [],
        }

    def region(self) -> str | None:
        region = _str(self.envelope.get("aliyunregionid"))
        if region is None:
            match = _REGION.match(_str(self.envelope.get("subject")) or "")
            region = match.group(1) if match else None
        return region

    def duration(self) -> float | None:
        start, end = self.times
        return (end - start).total_seconds() if start and end else None


def _iso_or_none(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# Each key of the view, in its order, from the payload's facts.
_VIEW: dict[str, Callable[[Facts], Any]] = {
    "outcome": lambda f: f.failure.outcome,
    "failed": lambda f: f.failure.outcome == "failed",
    "failure_reasons": lambda f: f.failure.reasons,
    "status": lambda f: _str(f.data.get("Status")) or _str(f.data.get("State")),
    "project": lambda f: _str(f.data.get("ProjectName")) or _str(f.data.get("Project")),
    "dataset": lambda f: _str(f.data.get("DatasetName")) or _str(f.data.get("Dataset")),
    "task_id": lambda f: _str(f.data.get("TaskId")) or _str(f.data.get("Id")) or _str(f.data.get("JobId")),
    "task_type": lambda f: f.task_type,
    "request_id": lambda f: _str(f.data.get("RequestId")),
    "start_time": lambda f: _iso_or_none(f.times[0]),
    "end_time": lambda f: _iso_or_none(f.times[1]),
    "duration_seconds": Facts.duration,
    "uri": lambda f: f.uris[0] if f.uris else None,
    "uris": lambda f: f.uris,
    "error_code": lambda f: f.error[0],
    "error_message": lambda f: f.error[1],
    "failed_files": lambda f: [{"uri": _str(x.get("URI")), "error": _str(x.get("Error"))} for x in f.failure.bad_files],
    "moderation": Facts.moderation,
    "user_data": lambda f: _str(f.data.get("UserData")),
    "event_source_id": lambda f: _str(f.data.get("EventSourceId")),
    "region": Facts.region,
}


def build_view(
    data: dict[str, Any],
    envelope: dict[str, Any],
    event_type: str,
    keys: Iterable[str] | None = None,
    facts: Facts | None = None,
) -> dict[str, Any]:
    """The view of a payload; with ``keys``, only those of them that are view keys (what rules that read
    only ``imm.<key>`` paths need: the same values, without the work of the rest). ``facts``: this
    payload's, when an earlier partial view worked some of them out already."""
    if event_type in ALERTMANAGER_TYPES:
        return _alert_view(data)
    facts = facts or Facts(data, envelope, event_type)
    if keys is None:
        return {key: build(facts) for key, build in _VIEW.items()}
    return {key: _VIEW[key](facts) for key in keys if key in _VIEW}


def _alert_view(alert: dict[str, Any]) -> dict[str, Any]:
    """An Alertmanager alert is no IMM payload: its view holds only what the alert says of itself (its
    status and times; a firing alert's endsAt is Alertmanager's guess, not an end)."""
    start = _iso(alert.get("startsAt"))
    end = _iso(alert.get("endsAt")) if alert.get("status") == "resolved" else None
    return dict.fromkeys(VIEW_KEYS) | {
        "outcome": "unknown",
        "failed": False,
        "failure_reasons": [],
        "status": _str(alert.get("status")),
        "start_time": start.isoformat() if start else None,
        "end_time": end.isoformat() if end else None,
        "duration_seconds": (end - start).total_seconds() if start and end else None,
        "uris": [],
        "failed_files": [],
    }


# The keys of the view and of its ``moderation`` part (the view always has every one of them).
VIEW_KEYS = frozenset(build_view({}, {}, "imm:Unknown"))
MODERATION_KEYS = frozenset(build_view({"Suggestion": "pass"}, {}, "imm:Unknown")["moderation"])


def example_payloads(event_type: str) -> dict[str, dict[str, Any]]:
    """Payloads of one event type for checking templates at load: ``full`` (a failure with every field
    the view reads filled in) and ``minimal`` (only the field that makes it a failure). Alertmanager
    alerts: ``full`` with the labels, annotations and links Prometheus alerts usually carry, ``minimal``
    with only what every alert has."""
    if event_type in ALERTMANAGER_TYPES:
        return _example_alerts(event_type.split(":", 1)[1])
    common: dict[str, Any] = {
        "ProjectName": "example-project",
        "DatasetName": "example-dataset",
        "RequestId": "00000000-0000-0000-0000-000000000000",
        "StartTime": "2026-01-01T00:00:00+08:00",
        "EndTime": "2026-01-01T00:00:05+08:00",
        "UserData": '{"k": "v"}',
        "URI": "oss://example-bucket/path/file.jpg",
    }
    family = event_type.split(":")[1] if event_type.count(":") >= 2 else ""
    minimal: dict[str, Any] = {"State": "Failed"} if family in ("Batch", "Trigger", "Binding") else {"Status": "Failed"}
    if family == "Task":
        task = event_type.rsplit(":", 1)[-1]
        full = common | {
            "TaskId": "Example-Task-Id",
            "TaskType": task,
            "Status": "Failed",
            "Code": "ResourceNotFound",
            "Message": "example error message",
            "EventSourceId": "example-source",
            "Targets": [{"URI": "oss://example-bucket/out/", "Code": "InvalidArgument", "Message": "bad target"}],
        }
        if task in MODERATION_TASKS:
            full |= {
                "Suggestion": "block",
                "Categories": ["porn"],
                "Frames": {"TotalCount": 100, "BlockFrames": [{"rate": 0.99, "offset": 10, "label": "porn"}]},
            }
    elif family in ("Batch", "Trigger"):
        full = common | {
            "Id": f"{family.lower()}-example",
            "State": "Failed",
            "Error": "example error",
            "Statistic": {"SubmitSuccess": 1, "SubmitFailure": 2},
        }
    elif family == "Binding":
        full = common | {"TaskId": "Example-Task-Id", "State": "Failed", "Error": "example error", "Marker": "m"}
    else:
        full = common | {
            "Success": False,
            "Message": "example error message",
            "Files": [{"URI": "oss://example-bucket/path/file.jpg", "Error": "[InvalidURI] example file error"}],
        }
        if family in ("FileMeta", "Engine"):
            minimal = {"Success": False}
    return {"full": full, "minimal": minimal}


def _example_alerts(status: str) -> dict[str, dict[str, Any]]:
    ends = "2026-01-01T00:05:00Z" if status == "resolved" else "0001-01-01T00:00:00Z"
    labels = {"alertname": "ExampleDown", "severity": "critical", "instance": "example:9100", "job": "node"}
    annotations = {"summary": "example summary", "description": "example description", "runbook_url": "https://x/"}
    full = {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": "2026-01-01T00:00:00Z",
        "endsAt": ends,
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=up+%3D%3D+0",
        "fingerprint": "0123456789abcdef",
        "alertmanager": {
            "receiver": "imm-router",
            "status": status,
            "externalURL": "http://alertmanager.example:9093",
            "groupKey": '{}:{alertname="ExampleDown"}',
            "groupLabels": {"alertname": "ExampleDown"},
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "truncatedAlerts": 0,
        },
    }
    minimal = full | {
        "labels": {"alertname": "ExampleDown"},
        "annotations": {},
        "generatorURL": "",
        "alertmanager": ALERT_CONTEXT | {"receiver": "imm-router", "status": status},
    }
    return {"full": full, "minimal": minimal}
