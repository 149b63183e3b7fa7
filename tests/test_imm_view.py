"""The normalized ``imm`` view understands every inconsistent payload shape."""

from __future__ import annotations

from typing import Any

import pytest

from router.decode import decode, decode_object
from router.embedded.demo import demo_records
from router.imm import VIEW_KEYS


def view(data: dict[str, Any], type_: str = "imm:Task:MediaConvert") -> dict[str, Any]:
    return decode_object({"specversion": "1.0", "id": "e", "source": "acs.imm", "type": type_, "data": data}).view


@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        ({"Status": "success", "Code": "200"}, "succeeded"),
        ({"Status": "Succeeded", "Code": ""}, "succeeded"),
        ({"Status": "Failed", "Code": "InvalidArgument"}, "failed"),
        ({"Status": "failed"}, "failed"),
        ({"Status": "FAILED"}, "failed"),
        ({"Status": "Succeeded", "Code": "InvalidArgument"}, "failed"),
        ({"Status": "Succeeded", "Code": 200}, "succeeded"),
        ({"Success": False, "Message": "InvalidParameter"}, "failed"),
        ({"Success": True, "Files": [{"URI": "oss://b/a", "Error": ""}]}, "succeeded"),
        (
            {"Success": True, "Files": [{"URI": "oss://b/a", "Error": "[InvalidArgument] File does not exist."}]},
            "failed",
        ),
        ({"State": "Failed", "Statistic": {"SubmitFailure": 0}}, "failed"),
        ({"State": "Succeeded", "Statistic": {"SubmitSuccess": 1, "SubmitFailure": 0}}, "succeeded"),
        ({"State": "Succeeded", "Statistic": {"SubmitFailure": 3}}, "failed"),
        ({"State": "Running"}, "running"),
        ({"Status": "Running", "Suggestion": "review"}, "running"),
        ({"Status": "Succeeded", "Targets": [{"Code": "", "URI": "oss://b/o"}]}, "succeeded"),
        ({"Status": "Succeeded", "Targets": [{"Code": "InvalidArgument", "Message": "bad"}]}, "failed"),
        ({"Status": "Succeeded", "Statistic": {"SubmitFailure": True}}, "succeeded"),
        ({}, "unknown"),
    ],
)
def test_outcome(data: dict[str, Any], outcome: str) -> None:
    assert view(data)["outcome"] == outcome
    assert view(data)["failed"] is (outcome == "failed")


def test_project_and_dataset_under_either_name() -> None:
    assert view({"ProjectName": "a", "DatasetName": "d"})[("project")] == "a"
    assert view({"Project": "b", "Dataset": "e"})["project"] == "b"
    assert view({"Project": "b", "Dataset": "e"})["dataset"] == "e"
    assert view({})["project"] is None


def test_error_code_and_message_from_each_shape() -> None:
    assert (
        view({"Status": "Failed", "Code": "Convert.Fail", "Message": "exit 1"})["error_code"],
        view({"Status": "Failed", "Code": "Convert.Fail", "Message": "exit 1"})["error_message"],
    ) == ("Convert.Fail", "exit 1")
    files = view({"Success": True, "Files": [{"URI": "oss://x", "Error": "[InvalidArgument] File does not exist."}]})
    assert files["error_code"] == "InvalidArgument"
    assert files["error_message"] == "[InvalidArgument] File does not exist."
    assert files["failed_files"] == [{"uri": "oss://x", "error": "[InvalidArgument] File does not exist."}]
    target = view({"Status": "Succeeded", "Targets": [{"Code": "Bad.Codec", "Message": "no codec"}]})
    assert (target["error_code"], target["error_message"]) == ("Bad.Codec", "no codec")
    assert view({"Status": "Succeeded", "Code": "", "Message": "ok"})["error_message"] is None


def test_times_duration_uris_and_task() -> None:
    v = view(
        {
            "TaskType": "TaskTypeFigureClustering",
            "TaskId": "t-1",
            "StartTime": "2022-07-22T02:52:40.685Z",
            "EndTime": "2022-07-22T02:53:41.185Z",
            "URI": "oss://b/in.mp4",
            "Targets": [{"URI": "oss://b/out.mp4"}, {"URI": ""}],
        },
        "imm:Task:FigureClustering",
    )
    assert v["task_type"] == "FigureClustering"
    assert v["task_id"] == "t-1"
    assert v["duration_seconds"] == pytest.approx(60.5)
    assert v["uris"] == ["oss://b/in.mp4", "oss://b/out.mp4"]
    assert v["uri"] == "oss://b/in.mp4"
    batch = view(
        {
            "Id": "batch-1",
            "CreateTime": "2023-06-21T11:42:21.006729926+08:00",
            "UpdateTime": "2023-06-21T11:42:22.006729926+08:00",
        },
        "imm:Batch:Notification",
    )
    assert batch["task_id"] == "batch-1"
    assert batch["duration_seconds"] == pytest.approx(1.0)


def test_moderation_view() -> None:
    v = view(
        {
            "TaskType": "ImageModeration",
            "Suggestion": "Block",
            "Categories": ["porn", 3],
            "Frames": {"TotalCount": 100, "BlockFrames": [{"rate": 0.99, "offset": 10, "label": "porn"}]},
        },
        "imm:Task:ImageModeration",
    )
    assert v["moderation"] == {
        "suggestion": "block",
        "categories": ["porn"],
        "block_frames": [{"rate": 0.99, "offset": 10, "label": "porn"}],
    }
    assert view({"Status": "Succeeded"})["moderation"] is None


def test_region_from_envelope_or_subject() -> None:
    ev = decode_object(
        {
            "specversion": "1.0",
            "id": "1",
            "type": "imm:Task:X",
            "source": "acs.imm",
            "subject": "acs:imm:cn-beijing:1649:project1/dataset1",
            "data": {},
        }
    )
    assert ev.view["region"] == "cn-beijing"


def test_each_key_built_alone_is_the_key_of_the_whole_view() -> None:
    """Rules that read a few keys get a view of only those: the same values as the whole view's, for every
    seed example and key, built alone or in pairs; keys the view lacks are left out, as a rule reads null."""
    seeds = 0
    for label, value, headers in demo_records():
        if label == "poison record":
            continue
        whole = decode(value, headers).view
        for key in VIEW_KEYS:
            assert decode(value, headers).view_of(frozenset({key, "outcome"})) == {
                key: whole[key],
                "outcome": whole["outcome"],
            }, (label, key)
        assert decode(value, headers).view_of(frozenset({"nope"})) == {}
        seeds += 1
    assert seeds > 60
