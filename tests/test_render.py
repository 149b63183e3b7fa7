"""Templates: sandboxed, strict, one file → every part; helpers; payload rules of each channel."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import orjson
import pytest

from router.channels.base import PayloadMeta
from router.channels.dingtalk import MAX_BODY_BYTES, DingTalkConfig
from router.channels.email import EmailConfig
from router.channels.registry import scrubber
from router.config import KafkaSettings
from router.errors import RenderError
from router.render import TemplateSet, clip, compact, humanize_duration, oss_console_url

META = PayloadMeta(event_id="ev-1", rule="r1")


def templates(tmp_path: Path, files: dict[str, str], zone: str = "Asia/Shanghai") -> TemplateSet:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return TemplateSet(tmp_path, zone)


def test_the_sandbox_blocks_unsafe_access(tmp_path: Path) -> None:
    ts = templates(tmp_path, {"t.j2": "{% block text %}{{ ''.__class__.__mro__[1].__subclasses__() }}{% endblock %}"})
    with pytest.raises(RenderError, match="unsafe"):
        ts.render_parts("t.j2", ("text",), {})


def test_undefined_names_are_errors_but_none_renders_empty(tmp_path: Path) -> None:
    ts = templates(tmp_path, {"t.j2": "{% block a %}{{ nope }}{% endblock %}{% block b %}[{{ x }}]{% endblock %}"})
    with pytest.raises(RenderError, match="'nope' is undefined"):
        ts.render_parts("t.j2", ("a",), {})
    assert ts.render_parts("t.j2", ("b",), {"x": None}) == {"b": "[]"}


def test_html_block_is_escaped_text_blocks_are_not(tmp_path: Path) -> None:
    ts = templates(
        tmp_path, {"t.j2": "{% block text %}{{ m }}{% endblock %}{% block html %}<p>{{ m }}</p>{% endblock %}"}
    )
    parts = ts.render_parts("t.j2", ("text", "html"), {"m": "<script>x</script> & 中文"})
    assert parts["text"] == "<script>x</script> & 中文"
    assert parts["html"] == "<p>&lt;script&gt;x&lt;/script&gt; &amp; 中文</p>"


def test_inherited_blocks_render_with_self_and_super(tmp_path: Path) -> None:
    ts = templates(
        tmp_path,
        {
            "base.j2": "{% block subject %}[{% block head %}base{% endblock %}]{% endblock %}"
            "{% block text %}{{ self.head() }} body{% endblock %}",
            "child.j2": '{% extends "base.j2" %}{% block head %}child {{ super() }}{% endblock %}',
        },
    )
    assert ts.blocks("child.j2") >= {"subject", "text", "head"}
    assert ts.render_parts("child.j2", ("subject", "text"), {}) == {
        "subject": "[child base]",
        "text": "child base body",
    }


def test_helpers(tmp_path: Path) -> None:
    ts = templates(
        tmp_path,
        {
            "t.j2": "{% block text %}{{ t | localtime('%H:%M %Z') }}|{{ d | duration }}|"
            "{{ {'名': '值'} | json }}|{{ u | oss_console('cn-beijing') }}|{{ s | clip(5) }}"
            "{% endblock %}"
        },
    )
    out = ts.render_parts(
        "t.j2", ("text",), {"t": "2024-08-20T07:03:08Z", "d": 3725, "u": "oss://bk/a b.mp4", "s": "abcdefgh"}
    )["text"]
    assert out == (
        '15:03 CST|1h 2m|{"名":"值"}|'
        "https://oss.console.aliyun.com/bucket/oss-cn-beijing/bk/object?path=a%20b.mp4|abcd…"
    )
    assert humanize_duration(0.25) == "250 ms" and humanize_duration(42) == "42s"
    assert humanize_duration(90061) == "1d 1h" and humanize_duration(None) == ""
    assert oss_console_url("https://x") == "https://x"
    assert clip("short") == "short"


def test_email_subject_can_never_carry_a_newline() -> None:
    email = EmailConfig(type="email", host="h", **{"from": "a@b"}, to=("c@d",))
    payload = email.build_payload({"subject": "x\r\nBcc: victim@evil\n", "text": "t"}, META)
    assert payload["subject"] == "x Bcc: victim@evil"
    assert payload["headers"] == {"X-IMM-Event-Id": "ev-1", "X-IMM-Rule": "r1"}
    assert payload["html"] is None


def dingtalk(**kw: object) -> DingTalkConfig:
    return DingTalkConfig(type="dingtalk", url="https://oapi.dingtalk.com/robot/send?access_token=T", **kw)


def test_dingtalk_mentions_are_written_into_the_text() -> None:
    payload = dingtalk(at_mobiles=("13800000000",), at_user_ids=("u1",)).build_payload(
        {"title": "t\nx", "text": "hello @u1"}, META
    )
    assert payload["markdown"] == {"title": "t x", "text": "hello @u1\n\n@13800000000"}
    assert payload["at"] == {"atMobiles": ["13800000000"], "atUserIds": ["u1"], "isAtAll": False}


def test_dingtalk_message_types() -> None:
    text = dingtalk(msgtype="text").build_payload({"title": "T", "text": "body"}, META)
    assert text["text"] == {"content": "T\nbody"}
    card = dingtalk(msgtype="actionCard").build_payload(
        {"title": "T", "text": "b", "button_title": "Open", "button_url": "https://x"}, META
    )
    assert card["actionCard"] == {"title": "T", "text": "b", "singleTitle": "Open", "singleURL": "https://x"}


@pytest.mark.parametrize("char", ["a", "中", "\n", '"'])
def test_dingtalk_body_is_kept_under_the_limit_with_a_visible_marker(char: str) -> None:
    payload = dingtalk().build_payload({"title": "T", "text": char * 30_000}, META)
    body = orjson.dumps(payload)
    assert len(body) <= MAX_BODY_BYTES
    assert payload["markdown"]["text"].endswith("…(truncated)")
    assert len(payload["markdown"]["text"]) > 1000


def test_dingtalk_url_must_carry_a_token_and_is_redacted() -> None:
    with pytest.raises(ValueError, match="access_token"):
        DingTalkConfig(type="dingtalk", url="https://oapi.dingtalk.com/robot/send")
    config = dingtalk()
    url = config.url.get_secret_value()
    assert scrubber(config, kafka_defaults=KafkaSettings())(f"POST {url} failed") == "POST *** failed"
    assert "access_token=T" not in repr(config)


@pytest.mark.parametrize(
    ("value", "zone"),
    [
        ("9999-12-31T23:59:59", "Asia/Shanghai"),
        ("9999-12-31T23:59:59+00:00", "Asia/Tokyo"),
        ("0001-01-01T00:00:00", "America/New_York"),
        ("0001-01-01T00:00:00+14:00", "UTC"),
    ],
)
def test_localtime_of_an_edge_year_falls_back_to_the_raw_string(tmp_path: Path, value: str, zone: str) -> None:
    ts = templates(tmp_path, {"t.j2": "{% block text %}[{{ t | localtime }}]{% endblock %}"}, zone)
    assert ts.render_parts("t.j2", ("text",), {"t": value}) == {"text": f"[{value}]"}


def budgeted(tmp_path: Path, body: str, *, timeout: float = 0.3, max_chars: int = 100_000) -> TemplateSet:
    (tmp_path / "t.j2").write_text("{% block text %}" + body + "{% endblock %}", encoding="utf-8")
    started = time.monotonic()
    ts = TemplateSet(tmp_path, "UTC", timeout_seconds=timeout, max_chars=max_chars)
    assert time.monotonic() - started < 2, "nothing may be computed at load"
    return ts


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.3s"),
        ("{% for x in range(10) recursive %}{% for y in range(10) %}{{ loop([1, 2]) }}{% endfor %}{% endfor %}", ""),
        ("{{ 'x' * 10**9 }}", "past 100000 characters"),
        ("{{ [1] * 10**9 }}", "past 100000 characters"),
        ("{{ 2 ** (10**9) }}", "too large a number"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "past 100000 characters"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "past 100000 characters",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "past 100000 characters",
        ),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
        ("{% macro f(n) %}{% for i in range(10) %}{{ f(n + 1) }}{% endfor %}{% endmacro %}{{ f(0) }}", ""),
    ],
)
def test_rendering_has_a_time_and_output_budget(tmp_path: Path, body: str, problem: str) -> None:
    ts = budgeted(tmp_path, body)
    started = time.monotonic()
    with pytest.raises(RenderError, match=r"template 't\.j2' block 'text': ") as caught:
        ts.render_parts("t.j2", ("text",), {})
    assert problem in str(caught.value)
    assert time.monotonic() - started < 3


def test_a_render_within_the_budget_is_unchanged(tmp_path: Path) -> None:
    ts = budgeted(tmp_path, "{% for i in range(1000) %}{{ loop.index }}{% endfor %}|{{ 'ab' * 3 }}|{{ 2 ** 10 }}")
    text = ts.render_parts("t.j2", ("text",), {})["text"]
    assert text.endswith("|ababab|1024") and text.startswith("123")


@pytest.mark.parametrize("url", ["javascript:alert(1)", "data:text/html,x", "/relative", ""])
def test_a_dingtalk_button_only_ever_points_at_http(url: str) -> None:
    card = dingtalk(msgtype="actionCard").build_payload(
        {"title": "T", "text": "b", "button_title": "Open", "button_url": url}, META
    )
    assert card["msgtype"] == "markdown" and "actionCard" not in card


def test_compact_cuts_every_list_and_string_at_any_depth_and_keeps_the_rest() -> None:
    value = {
        "n": 1,
        "f": 1.5,
        "b": True,
        "none": None,
        "short": "abc",
        "long": "x" * 10,
        "list": list(range(5)),
        "nested": [["y" * 10, [1, 2, 3, 4]], {"deep": ("z" * 10, 7, 8, 9)}],
        "mapping": MappingProxyType({"k": "w" * 10}),
    }
    assert compact(value, items=3, chars=5) == {
        "n": 1,
        "f": 1.5,
        "b": True,
        "none": None,
        "short": "abc",
        "long": "xxxx…",
        "list": [0, 1, 2],
        "nested": [["yyyy…", [1, 2, 3]], {"deep": ["zzzz…", 7, 8]}],
        "mapping": {"k": "wwww…"},
    }
    assert compact("x" * 10, chars=5) == "xxxx…" and compact(7) == 7


@pytest.mark.parametrize(
    "lookup",
    [
        "d.uris",
        "d['uris']",
        "d.missing is undefined",
        "d.keys",
        "d['keys']",
        "d.items() | list",
        "d.get('uris')",
        "d.__class__",
        "d.__len__",
        "d.mro",
        "d.nested.deep",
        "d.nested.items",
        "d.update",
    ],
)
def test_a_dict_lookup_gives_what_jinjas_own_sandbox_gives(tmp_path: Path, lookup: str) -> None:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    context = {"d": {"uris": ["oss://b/f"], "keys": "k", "nested": {"deep": 1, "items": "i"}, "n": None}}
    source = "{% block text %}{{ " + lookup + " }}{% endblock %}"

    def outcome(render: Callable[[], str]) -> str:
        try:
            return render()
        except Exception as exc:  # ours wraps Jinja's errors in RenderError: compare whether it failed, and why
            return "error: unsafe" if "unsafe" in str(exc) else "error"

    ours = outcome(lambda: templates(tmp_path, {"t.j2": source}).render_parts("t.j2", ("text",), context)["text"])
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined).from_string(source)
    theirs = outcome(lambda: jinja.render(context))
    # Bound methods print their object's address: compare what they are, not where.
    assert ours.split(" at 0x")[0] == theirs.split(" at 0x")[0]
