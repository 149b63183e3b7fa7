"""`imm-router check`: configs, rules and templates that would crash `run` or silently drop alerts are
refused (exit 2) or warned about, each with file:line and what to fix."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.rules import compile_expression
from tests.conftest import ROOT
from tests.test_cli import imm_router


def config_dir(tmp_path: Path, config: str = "", templates: dict[str, str] | None = None) -> Path:
    """A copy of the shipped rules and templates with a config of channels they use; ``config`` is appended,
    ``templates`` (name → source) are written over the copies."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    for name, source in (templates or {}).items():
        (tmp_path / "templates" / name).write_text(source)
    path = tmp_path / "router.yaml"
    path.write_text(
        "channels:\n"
        "  oncall-dingtalk:\n"
        "    type: dingtalk\n"
        '    url: "https://oapi.dingtalk.com/robot/send?access_token=t"\n'
        "  ops-email:\n"
        "    type: email\n"
        "    host: smtp.example.com\n"
        "    from: a@example.com\n"
        "    to: [b@example.com]\n"
        "  alerts-topic: {type: kafka, topic: alerts}\n" + config
    )
    return path


def check(path: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = imm_router("check", "--config", str(path), *extra, env=env)
    return result.returncode, result.stderr


# --- defect 7: what `run` could not use is refused at load -----------------------------------------


def test_unusable_urls_and_missing_files_are_refused_at_their_lines(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    config.write_text(
        config.read_text().replace("oapi.dingtalk.com/", "oapi.dingtalk.com:99999/") + "  hook:\n"
        "    type: webhook\n"
        '    url: "not a url"\n'
        "kafka:\n"
        "  security_protocol: SSL\n"
        "  ssl_cafile: /nonexistent/ca.pem\n"
    )
    status, err = check(config)
    assert status == 2, err
    assert f"{config}:4: channels.oncall-dingtalk.url: not a usable http(s) URL" in err
    assert "invalid port number" in err
    assert f"{config}:13: channels.hook.url: not a usable http(s) URL" in err
    assert f"{config}:16: kafka.ssl_cafile: file /nonexistent/ca.pem does not exist" in err
    assert "access_token=t" not in err  # the URL is a secret


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    config = config_dir(tmp_path, f"kafka:\n  security_protocol: SSL\n  ssl_cafile: {bogus}\n")
    status, err = check(config)
    assert status == 2 and f"CA file {bogus} cannot be loaded" in err, err


# --- defect 8: YAML aliases ------------------------------------------------------------------------


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    levels = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, 9):  # 9**9 strings if expanded
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * 9) + "]")
    config.write_text(config.read_text() + "\n".join(levels) + "\n")
    started = time.monotonic()
    status, err = check(config)
    assert status == 2
    assert f"{config}:12: YAML alias *a is not allowed" in err
    assert time.monotonic() - started < 30  # a subprocess start; the expansion would take hours


# --- defect 9: pathological `when` -----------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        " || ".join(f"imm.project == 'p{i}'" for i in range(500)),
        "!" * 300 + "imm.failed",
        "(" * 2000 + "a" + ")" * 2000,
    ],
)
def test_a_pathological_when_is_a_config_error_with_its_line(tmp_path: Path, when: str) -> None:
    config = config_dir(tmp_path)
    one_rule(tmp_path, "deep", when)
    for command in ("check", "run"):
        result = imm_router(command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert f"{tmp_path / 'rules' / 'deep.yaml'}:3: rule 'deep': `when`" in result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="nested"):
        compile_expression(when, what="--match")


# --- defect 14: ROUTER_ overrides ------------------------------------------------------------------


def test_a_malformed_environment_override_is_a_clear_error(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    status, err = check(config, env={"ROUTER_CHANNELS": "{bad"})
    assert status == 2 and "Traceback" not in err
    assert "environment variable ROUTER_CHANNELS is not valid JSON" in err
    status, err = check(
        config,
        env={"ROUTER_CHANNELS": '{"x": {"type": "dingtalk", "urll": "u"}}', "ROUTER_KAFKA__SESSION_TIMEOUT_MS": "-1"},
    )
    assert status == 2
    assert "environment variable ROUTER_CHANNELS: channels.x.urll: unknown key; did you mean 'url'?" in err
    assert "environment variable ROUTER_KAFKA__SESSION_TIMEOUT_MS: kafka.session_timeout_ms:" in err
    assert str(config) not in err  # nothing is blamed on the file


# --- pydantic errors: the key's own line, as written, with a did-you-mean ---------------------------


def test_errors_point_at_the_bad_key_without_internal_segments(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    config.write_text(
        config.read_text().replace("    to: [b@example.com]\n", "    to: [b@example.com]\n    prot: 25\n")
        + "kafka:\n  bootstrap_server: x\n"
    )
    status, err = check(config)
    assert status == 2
    assert f"{config}:10: channels.ops-email.prot: unknown key; did you mean 'port'?" in err
    assert f"{config}:13: kafka.bootstrap_server: unknown key; did you mean 'bootstrap_servers'?" in err
    assert ".email." not in err
    config_dir(tmp_path / "rules-typo")
    rule = tmp_path / "rules-typo" / "rules" / "typo.yaml"
    rule.write_text(
        "rules:\n  - name: typo\n    when: imm.failed\n    notify:\n"
        "      - channel: alerts-topic\n        template: kafka/alert.json.j2\n        group_wait: 1m\n"
        "        throtle: {key: [imm.project], for: 1m}\n"
    )
    status, err = check(tmp_path / "rules-typo" / "router.yaml")
    assert f"{rule}:8: rules.0.notify.0.throtle: unknown key; did you mean 'throttle'?" in err, err


# --- `check` catches what silently drops alerts ---------------------------------------------------


def add_rule(tmp_path: Path, body: str, name: str = "custom.yaml") -> Path:
    path = tmp_path / "rules" / name
    path.write_text(body)
    return path


def one_rule(tmp_path: Path, name: str, when: str) -> Path:
    """A rule file of one rule sending to the Kafka channel: its name on line 2, its `when` on line 3."""
    return add_rule(
        tmp_path,
        f"rules:\n  - name: {name}\n    when: {json.dumps(when)}\n"
        "    notify: [{channel: alerts-topic, template: kafka/alert.json.j2}]\n",
        f"{name}.yaml",
    )


def test_an_unknown_function_is_an_error_with_a_did_you_mean(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    rule = one_rule(tmp_path, "globbed", "globb('imm:Task:*', event.type)")
    status, err = check(config)
    assert status == 2
    assert f"{rule}:3: rule 'globbed': `when`: unknown function globb(); did you mean 'glob()'?" in err


def test_unknown_keys_and_double_quoted_strings_are_warnings_and_strict_refuses_them(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    rule = add_rule(
        tmp_path,
        "rules:\n"
        "  - name: typos\n"
        "    events: ['imm:task:MediaConvert', 'imm:Task:OfficeConvert', 'imm:Task:FaceClustering']\n"
        "    when: >-\n"
        "      imm.projct == 'prod' && event.tpye == 'imm:Task:MediaConvert'\n"
        "      && imm.project == \"prod\" && imm.moderation.sugestion == 'block'\n"
        "      && Files[?imm.whatever]\n"  # inside a filter `imm` is the element's key, not the view
        "    notify: [{channel: alerts-topic, template: kafka/alert.json.j2}]\n",
    )
    status, err = check(config)
    assert status == 0, err
    expected = [
        f"{rule}:4: rule 'typos': imm.projct is not a key of `imm` (always null); did you mean 'project'?",
        f"{rule}:4: rule 'typos': event.tpye is not a key of `event` (always null); did you mean 'type'?",
        f"{rule}:4: rule 'typos': imm.moderation.sugestion is not a key of imm.moderation (always null); "
        "did you mean 'suggestion'?",
        f"""{rule}:4: rule 'typos': "prod" after == is a field name in JMESPath, not a string; write 'prod'""",
        f"{rule}:3: rule 'typos': events pattern 'imm:task:MediaConvert' matches no IMM event type; "
        "did you mean 'imm:Task:MediaConvert'?",
        f"{rule}:3: rule 'typos': events pattern 'imm:Task:OfficeConvert' matches no IMM event type; "
        "did you mean 'imm:Task:OfficeConversion'?",
        f"{rule}:3: rule 'typos': events pattern 'imm:Task:FaceClustering' matches no IMM event type; "
        "events arrive as 'imm:Task:FigureClustering', write that",
    ]
    for line in expected:
        assert f"warning: {line}" in err
    assert "whatever" not in err
    assert err.count("warning: ") == len(expected)
    status, err = check(config, "--strict")
    assert status == 2 and f"error: {len(expected)} warning(s) and --strict" in err


def test_undefined_template_names_are_errors_at_their_lines(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    config = config_dir(
        tmp_path,
        templates={
            "kafka/runbook.json.j2": "{% block key %}{{ imm.task_id }}{% endblock %}\n{% block value %}\n"
            "{{ runbook_url }} {{ imm.projct }}\n"
            "{{ imm.made_up | default('') }}{% if imm.other is defined %}{{ imm.other }}{% endif %}\n"
            "{% if link is defined %}{{ link }}{% endif %}\n"
            "{% for k in [1] %}{{ loop.index }}{{ k }}{% endfor %}{% endblock %}\n",
            "digest/kafka.j2": "{% block key %}digest{% endblock %}\n"
            "{% block value %}{{ total }} {{ count }}{% endblock %}\n",
            "group/kafka.j2": "{% block key %}g{% endblock %}\n"
            "{% block value %}{{ rule.name }} {{ imm.project }}{% endblock %}\n",
        },
    )
    add_rule(
        tmp_path,
        "rules:\n  - name: runbook\n    when: imm.failed\n    notify:\n"
        "      - {channel: alerts-topic, template: kafka/runbook.json.j2, group_by: [imm.project]}\n",
    )
    status, err = check(config)
    assert status == 2
    assert (
        f"{templates}/kafka/runbook.json.j2:3: template 'kafka/runbook.json.j2': 'runbook_url' is not defined; "
        "a 'kafka/runbook.json.j2' render has: channel, data, event, imm, rule" in err
    )
    assert (
        f"{templates}/kafka/runbook.json.j2:3: template 'kafka/runbook.json.j2': imm.projct is not a key of the "
        "imm view; did you mean 'project'?" in err
    )
    assert f"{templates}/digest/kafka.j2:2: template 'digest/kafka.j2': 'total' is not defined" in err
    assert f"{templates}/group/kafka.j2:2: template 'group/kafka.j2': 'imm' is not defined" in err
    assert "made_up" not in err and "other" not in err and "link" not in err  # guarded: default / is defined


def test_templates_are_rendered_for_every_event_type_their_rules_take(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    config = config_dir(
        tmp_path,
        templates={
            "kafka/stats.json.j2": "{% block key %}{{ imm.task_id }}{% endblock %}\n"
            "{% block value %}\n{{ data.Statistic.SubmitFailure }}\n{% endblock %}\n",
            # Group messages carry the rule's name and severity, not its description.
            "group/kafka.j2": "{% block key %}g{% endblock %}\n{% block value %}{{ rule.runbook }}{% endblock %}",
            # A render that raises anything at all is reported, not a traceback (a recursive macro).
            "kafka/deep.json.j2": "{% block value %}{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}\n"
            "{{ down(0) }}{% endblock %}\n",
            # A rule about one project is checked with the example given that project.
            "kafka/prod.json.j2": "{% block key %}k{% endblock %}\n"
            "{% block value %}{{ imm.project }}\n{{ data.Files[0].URI }}{% endblock %}\n",
        },
    )
    add_rule(
        tmp_path,
        "rules:\n  - name: stats\n    events: ['imm:Batch:*', 'imm:Trigger:*']\n    when: imm.failed\n    notify:\n"
        "      - {channel: alerts-topic, template: kafka/stats.json.j2, throttle: {key: [imm.project], for: 1m}}\n"
        "  - name: prod\n    events: ['imm:Task:MediaConvert']\n    when: \"imm.project == 'prod' && imm.failed\"\n"
        "    notify: [{channel: alerts-topic, template: kafka/prod.json.j2}]\n"
        "  - name: deep\n    events: ['imm:Task:MediaConvert']\n    when: imm.failed\n"
        "    notify: [{channel: alerts-topic, template: kafka/deep.json.j2}]\n",
    )
    status, err = check(config)
    assert status == 0, err
    assert (
        f"warning: {templates}/kafka/prod.json.j2:3: template 'kafka/prod.json.j2' block 'value': 'dict object' "
        "has no attribute 'Files' (for imm:Task:MediaConvert (full), imm:Task:MediaConvert (minimal))" in err
    )
    assert (
        f"warning: {templates}/kafka/stats.json.j2:3: template 'kafka/stats.json.j2' block 'value': "
        "'dict object' has no attribute 'Statistic' (for imm:Batch:Notification (minimal), "
        "imm:Trigger:Notification (minimal)); a real event like that would lose its alert" in err
    )
    assert f"warning: {templates}/group/kafka.j2:2: template 'group/kafka.j2' block 'value':" in err
    assert (
        f"warning: {templates}/kafka/deep.json.j2:1: template 'kafka/deep.json.j2' block 'value': recursion too deep"
        in err
    )
    assert "has no attribute 'runbook' (for a group of rule stats)" in err
    assert check(config, "--strict")[0] == 2


def test_the_shipped_rules_and_templates_are_clean_under_strict(tmp_path: Path) -> None:
    assert check(ROOT / "router.example.yaml", "--strict") == (0, "")
    # The demo's config, and a webhook channel so its shipped digest and group templates are used too.
    config = config_dir(tmp_path)
    text = config.read_text().replace("type: kafka, topic: alerts", "type: webhook, url: 'https://example.com/h'")
    config.write_text(text)
    for rules in (tmp_path / "rules").glob("*.yaml"):
        rules.write_text(rules.read_text().replace("kafka/alert.json.j2", "webhook/alert.json.j2"))
    assert check(config, "--strict") == (0, "")
    from router.embedded.demo import demo_config

    demo = demo_config(tmp_path, "127.0.0.1:9", 2525, "http://127.0.0.1:9/robot/send?access_token=demo")
    assert check(demo, "--strict") == (0, "")


def test_route_fails_when_a_rule_cannot_be_evaluated(tmp_path: Path) -> None:
    config = config_dir(tmp_path)
    rule = one_rule(tmp_path, "broken", "starts_with(Status, 'F')")
    event = b'{"TaskType": "MediaConvert", "TaskId": "t1", "Status": 7}'
    result = imm_router("route", "--config", str(config), "-", stdin=event)
    assert result.returncode == 1
    assert f"error: event t1: rule broken ({rule}:2) could not be evaluated and was treated as not matching" in (
        result.stderr
    )
    ok = imm_router("route", "--config", str(config), "-", stdin=event.replace(b"7", b'"Fine"'))
    assert ok.returncode == 0, ok.stderr


def test_render_renders_digest_and_group_templates(tmp_path: Path) -> None:
    events = [str(p) for p in sorted((ROOT / "tests" / "events" / "mns").glob("*-Failed.json"))[:3]]
    digest = imm_router("render", "--template", "digest/email.j2", "--digest", *events)
    assert digest.returncode == 0, digest.stderr
    assert "[IMM DIGEST] 3 alerts: example-rule" in digest.stdout
    group = imm_router("render", "--template", "group/dingtalk.j2", "--group", "--rule", "task-failed", *events)
    assert group.returncode == 0, group.stderr
    assert "--- title ---" in group.stdout and "task-failed" in group.stdout and "3" in group.stdout
    plain = imm_router("render", "--template", "group/email.j2", events[0])
    assert plain.returncode == 1 and "'count' is undefined" in plain.stderr


def test_the_checked_contexts_are_what_renders_get() -> None:
    from router.engine import (
        DIGEST_CONTEXT,
        EVENT_CONTEXT,
        GROUP_CONTEXT,
        digest_context,
        event_context,
        example_event,
        group_context,
        group_facts,
        rule_doc,
    )

    event = example_event("imm:Task:MediaConvert", {})
    assert set(event_context(event, event.event_doc(), {})) | {"channel"} == EVENT_CONTEXT
    assert set(digest_context("c", [])) == DIGEST_CONTEXT
    facts = group_facts("group", {}, rule_doc(None, "r"), "", "", 1, 1, 1)
    assert set(group_context("c", [], facts, 10)) == GROUP_CONTEXT


async def test_the_service_logs_the_warnings_at_start_and_on_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from router.engine import load
    from router.service import Service

    config = config_dir(tmp_path)
    rule = one_rule(tmp_path, "typo", "imm.projct")
    caplog.set_level("WARNING", logger="router.service")
    service = Service(load(config), config)
    warning = f"config: {rule}:3: rule 'typo': imm.projct is not a key of `imm`"
    assert sum(warning in r.getMessage() for r in caplog.records) == 1
    assert service.reload()
    assert sum(warning in r.getMessage() for r in caplog.records) == 2
