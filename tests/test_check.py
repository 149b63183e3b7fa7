"""`imm-router check`: configs, rules and templates that would crash `run` or silently drop alerts are
refused (exit 2) or warned about, each with file:line and what to fix."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.rules import compile_expression
from tests.conftest import ROOT
from tests.test_cli import imm_router


def config_dir(tmp_path: Path, config: str = "") -> Path:
    """A copy of the shipped rules and templates with a config of channels they use; ``config`` is appended."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
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
    (tmp_path / "rules" / "deep.yaml").write_text(
        f'rules:\n  - name: deep\n    when: "{when}"\n'
        "    notify: [{channel: alerts-topic, template: kafka/alert.json.j2}]\n"
    )
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
