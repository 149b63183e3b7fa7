"""The commands as people run them: real processes, real files, exit codes and messages."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import load_settings
from router.errors import ConfigError
from tests.conftest import EVENTS, EXAMPLE_ENV, ROOT

EXAMPLE = ROOT / "router.example.yaml"


def imm_router(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **EXAMPLE_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=60,
    )


def test_check_passes_on_the_shipped_files() -> None:
    result = imm_router("check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "rules:     7" in result.stdout


def test_check_fails_with_an_actionable_message(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("rules_dir: rules\nchanels: {}\n")
    result = imm_router("check", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: chanels: unknown key; did you mean 'channels'?" in result.stderr
    missing = imm_router("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found; pass --config PATH" in missing.stderr


def test_route_prints_one_json_line_per_notification_for_every_seed() -> None:
    files = sorted(str(p) for p in EVENTS.rglob("*.json"))
    result = imm_router("route", "--config", str(EXAMPLE), *files)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and all(
        set(line) == {"event_id", "event_type", "rule", "channel", "template", "payload"} for line in lines
    )
    by_channel = {line["channel"]: line["payload"] for line in lines}
    assert set(by_channel["ops-email"]) >= {"from", "to", "subject", "text", "html"}
    assert set(by_channel["alerts-topic"]) == {"topic", "key", "value", "headers"}
    assert by_channel["oncall-dingtalk"]["msgtype"] == "markdown"
    assert {line["rule"] for line in lines} == {
        "task-failed",
        "moderation-block",
        "moderation-review",
        "file-meta-error",
        "submit-failure",
        "alertmanager-critical",
    }


def test_route_reads_stdin_arrays_and_json_lines_and_reports_bad_inputs() -> None:
    failed = json.loads((EVENTS / "eventbridge" / "Task-AsyncTask.json").read_text())
    mns = {
        "id": "m1",
        "source": "acs.imm",
        "type": "imm:Task:ImageModeration",
        "time": "1724133063161",
        "content": (EVENTS / "mns" / "ImageModeration-block.json").read_text(),
    }
    lines = b"\n".join(
        [
            json.dumps(failed).encode(),
            b"{broken",
            base64.b64encode(json.dumps(mns).encode()),
            b"[1, 2]",
        ]
    )
    result = imm_router("route", "--config", str(EXAMPLE), "-", stdin=lines)
    assert result.returncode == 1
    assert "<stdin>:2: value is not valid JSON" in result.stderr
    assert "<stdin>:4: event is not a JSON object (got array)" in result.stderr
    rules = [json.loads(line)["rule"] for line in result.stdout.splitlines()]
    assert rules.count("task-failed") == 3 and rules.count("moderation-block") == 3

    array = imm_router("route", "--config", str(EXAMPLE), "-", stdin=json.dumps([failed, 7]).encode())
    assert array.returncode == 1 and "<stdin>[1]: event is not a JSON object (got number)" in array.stderr
    assert len(array.stdout.splitlines()) == 3


def test_rule_tests_of_the_shipped_rules_pass() -> None:
    result = imm_router("test", "--config", str(EXAMPLE), *map(str, sorted((ROOT / "tests/rules").glob("*.yaml"))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_a_failing_rule_test_shows_a_diff(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - name: wrong expectation\n"
        "    event: {TaskType: MediaConvert, TaskId: x, Status: Failed}\n"
        "    expect:\n"
        "      - {rule: moderation-block, channel: oncall-dingtalk}\n"
        "      - {rule: task-failed, channel: alerts-topic, contains: [no-such-text], assert: [\"topic == 'x'\"]}\n"
    )
    result = imm_router("test", "--config", str(EXAMPLE), str(cases))
    assert result.returncode == 1
    assert f"FAIL {cases}:2 wrong expectation" in result.stdout
    assert "-moderation-block → oncall-dingtalk" in result.stdout
    assert "+task-failed → ops-email" in result.stdout
    assert "payload lacks 'no-such-text'" in result.stdout
    assert "assert failed: topic == 'x'" in result.stdout
    assert "0 passed, 1 failed" in result.stdout


def test_render_shows_every_part() -> None:
    result = imm_router(
        "render",
        "--config",
        str(EXAMPLE),
        "--template",
        "email/task-failed.j2",
        str(EVENTS / "mns" / "MediaConvert-Failed.json"),
    )
    assert result.returncode == 0, result.stderr
    for part in ("--- subject ---", "--- text ---", "--- html ---"):
        assert part in result.stdout
    assert "Invalid data found when processing input" in result.stdout


def test_env_expansion_overrides_and_missing_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("kafka:\n  bootstrap_servers: ${BROKERS:-b:1}\n  group_id: ${GROUP}\n")
    monkeypatch.setenv("GROUP", "g1")
    assert load_settings(config).kafka.bootstrap_servers == "b:1"
    monkeypatch.setenv("ROUTER_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    settings = load_settings(config)
    assert (settings.kafka.bootstrap_servers, settings.kafka.group_id) == ("env:9092", "g1")
    monkeypatch.delenv("GROUP")
    with pytest.raises(ConfigError, match=r"router\.yaml:3: environment variable GROUP is not set"):
        load_settings(config)


def test_relative_directories_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "router.yaml").write_text("rules_dir: r\ntimezone: Asia/Shanghai\n")
    assert load_settings(tmp_path / "router.yaml").rules_dir == tmp_path / "r"
    (tmp_path / "router.yaml").write_text("timezone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        load_settings(tmp_path / "router.yaml")


def test_secrets_never_reach_output_errors_or_reprs(tmp_path: Path) -> None:
    secrets = {
        "DINGTALK_TOKEN": "tok-s3cr3t-AAA",
        "DINGTALK_SECRET": "sig-s3cr3t-BBB",
        "SMTP_PASSWORD": "pw-s3cr3t-CCC",
    }
    files = sorted(str(p) for p in EVENTS.rglob("*.json"))
    outputs = [
        imm_router("route", "--config", str(EXAMPLE), *files, "-", stdin=b"{bad", env=secrets),
        imm_router("check", "--config", str(EXAMPLE), env=secrets),
    ]
    bad = tmp_path / "router.yaml"
    bad.write_text(EXAMPLE.read_text().replace("port: 587", "port: -1"))
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    outputs.append(imm_router("check", "--config", str(bad), env=secrets))
    assert outputs[2].returncode == 2
    for result in outputs:
        for secret in secrets.values():
            assert secret not in result.stdout and secret not in result.stderr


def test_secrets_are_hidden_in_settings_reprs_and_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "DINGTALK_TOKEN": "tok-s3cr3t-AAA",
        "DINGTALK_SECRET": "sig-s3cr3t-BBB",
        "SMTP_PASSWORD": "pw-s3cr3t-CCC",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(EXAMPLE)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    for secret in secrets.values():
        assert secret not in shown
    assert settings.channels["ops-email"].password.get_secret_value() == "pw-s3cr3t-CCC"  # type: ignore[union-attr]


def test_webhook_header_values_are_secrets_route_and_replay_never_print(tmp_path: Path) -> None:
    bearer = "Bearer hdr-s3cret-0123456789"
    rules = tmp_path / "rules"
    rules.mkdir()
    notify = [{"channel": "hook", "template": "webhook/alert.json.j2"}]
    (rules / "r.yaml").write_text(json.dumps({"rules": [{"name": "r", "when": "imm.failed", "notify": notify}]}))
    hook = {"type": "webhook", "url": "https://hooks.example.com/imm", "headers": {"Authorization": bearer}}
    config = tmp_path / "router.yaml"
    config.write_text(
        json.dumps({"rules_dir": "rules", "templates_dir": str(ROOT / "templates"), "channels": {"hook": hook}})
    )
    event = str(EVENTS / "eventbridge" / "Task-AsyncTask.json")
    routed = imm_router("route", "--config", str(config), event)
    assert routed.returncode == 0, routed.stderr
    (line,) = [json.loads(text) for text in routed.stdout.splitlines()]
    assert line["channel"] == "hook" and "Authorization" not in line["payload"]["headers"]
    replayed = imm_router("replay", "--config", str(config), "--file", event, "--dry-run")
    assert replayed.returncode == 0, replayed.stderr
    assert '"hook"' in replayed.stdout
    for output in (routed, replayed):
        assert "hdr-s3cret" not in output.stdout + output.stderr
    assert "hdr-s3cret" not in repr(load_settings(config))


def test_route_holds_events_to_max_event_bytes_as_the_service_does(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(EXAMPLE.read_text().replace("log_level: INFO", "log_level: INFO\nmax_event_bytes: 2000"))
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    event = json.loads((EVENTS / "eventbridge" / "Task-AsyncTask.json").read_text())
    event["data"]["Padding"] = "p" * 2_500
    path = tmp_path / "big.json"
    path.write_text(json.dumps(event))
    result = imm_router("route", "--config", str(config), str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert f"error: {path}: record is " in result.stderr and "over the 2000-byte limit" in result.stderr
