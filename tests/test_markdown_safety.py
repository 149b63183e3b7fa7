"""Event values cannot change what a DingTalk message says or where its links go (markdown parsed with
markdown-it's CommonMark parser), and links only ever point at http(s) addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from router.channels.base import PayloadMeta
from router.decode import decode_object
from router.engine import Engine
from router.render import markdown_code, markdown_text, oss_console_url
from tests.test_delivery_support import failed_event, make_engine

HOSTILE = {
    "ProjectName": "prod\n### 🔴 FORGED HEADING\n- **fake**: row",
    "TaskId": "t-1` **break out** `x",
    "Code": "E <b>bold</b> &#64;所有人",
    "Message": "see [oss://prod-bucket/x](https://evil.example/phish) ![img](https://evil.example/i.png) @所有人 *em*",
    "URI": "oss://prod-bucket/x](https://evil.example/phish",
}
CONSOLE = "https://oss.console.aliyun.com/"
META = PayloadMeta(event_id="e", rule="r")
md = MarkdownIt("commonmark")


def structure(tokens: list[Token]) -> list[Any]:
    """Token types and tags, inline children included, without the text: the shape of the message."""
    out: list[Any] = []
    for token in tokens:
        out.append((token.type, token.tag))
        if token.children:
            out.append(structure(token.children))
    return out


def links(tokens: list[Token]) -> list[str]:
    found = []
    for token in tokens:
        if token.type in ("link_open", "image"):
            found.append(str(token.attrs.get("href") or token.attrs.get("src")))
        found += links(token.children or [])
    return found


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    url = "https://oapi.dingtalk.com/robot/send?access_token=T"
    return make_engine(tmp_path_factory.mktemp("md"), {"ding": {"type": "dingtalk", "url": url}})


def dingtalk_text(engine: Engine, data: dict[str, Any], template: str = "dingtalk/task-failed.md.j2") -> str:
    """The markdown text of the DingTalk message ``template`` makes of a failure carrying ``data``."""
    doc = failed_event(1)
    doc["data"] |= data
    parts = engine.templates.render_parts(template, ("title", "text"), engine_context(engine, decode_object(doc)))
    text: str = engine.settings.channels["ding"].build_payload(parts, META)["markdown"]["text"]
    return text


def engine_context(engine: Engine, event: Any) -> dict[str, Any]:
    return {
        "event": event.event_doc(),
        "data": event.data,
        "imm": event.view,
        "rule": {"name": "r", "description": "d", "severity": "critical", "labels": {}},
        "channel": "ding",
    }


@pytest.mark.parametrize(
    "template",
    ["dingtalk/task-failed.md.j2", "dingtalk/file-meta-error.md.j2", "dingtalk/submit-failure.md.j2"],
)
def test_hostile_event_values_leave_the_message_structure_alone(engine: Engine, template: str) -> None:
    benign = {key: "oss://bucket/key" if key == "URI" else "plain" for key in HOSTILE}
    text = dingtalk_text(engine, HOSTILE, template)
    tokens = md.parse(text)
    assert structure(tokens) == structure(md.parse(dingtalk_text(engine, benign, template)))
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h3"]
    assert all(link.startswith(CONSOLE) for link in links(tokens)), links(tokens)
    assert "@所有人" not in text
    # The values are still all there to read.
    rendered = "".join(t.content for t in tokens if t.type == "inline")
    for fragment in ("FORGED HEADING", "break out", "<b>bold</b>", "oss://prod-bucket/x](https://evil.example/phish"):
        assert fragment in rendered.replace("\\", ""), fragment


def test_digest_and_group_messages_escape_the_alerts_they_list(engine: Engine) -> None:
    doc = failed_event(1, event_id="e` [x](https://evil.example) `")
    doc["data"] |= HOSTILE
    notifications = engine.route(decode_object(doc)).notifications
    for payload in (
        engine.render_digest("ding", notifications),
        engine.render_group(
            "ding",
            "group/dingtalk.j2",
            notifications,
            {
                "kind": "group",
                "group": {"imm.project": HOSTILE["ProjectName"]},
                "rule": {"name": "r", "severity": "info"},
                "first": "2026-11-02T10:00:00+00:00",
                "last": "x](https://evil.example)",
                "part": 1,
                "parts": 1,
            },
        ),
    ):
        tokens = md.parse(payload["markdown"]["text"])
        assert links(tokens) == [] and [t.tag for t in tokens if t.type == "heading_open"] == ["h3"]


def test_markdown_filters() -> None:
    assert markdown_text("a\n# b *c* [d](e) @all `f` <g> & ~h~ _i_ |") == (
        "a # b \\*c\\* \\[d\\](e) \uff20all \\`f\\` \\<g\\> \\& \\~h\\~ \\_i\\_ \\|"
    )
    assert markdown_text(None) == ""
    assert markdown_code("t`1\n@x") == "`t'1 \uff20x`"


@pytest.mark.parametrize(
    ("uri", "region", "expected"),
    [
        ("javascript:alert(1)", None, ""),
        ("JAVASCRIPT:alert(1)", None, ""),
        ("data:text/html,<script>", None, ""),
        ("//evil.example/x", None, ""),
        ("/relative/path", None, ""),
        ("https://example.com/a b(c)<d>'e\"", None, "https://example.com/a%20b%28c%29%3Cd%3E%27e%22"),
        ("HTTP://example.com/x", None, "HTTP://example.com/x"),
        (
            "oss://bk/dir/a b.mp4",
            "cn-beijing/../../evil?x=",
            "https://oss.console.aliyun.com/bucket/oss-cn-beijing%2F..%2F..%2Fevil%3Fx%3D/bk/object?path=dir%2Fa%20b.mp4",
        ),
        ("oss://b k)/x", None, "https://oss.console.aliyun.com/bucket/oss-cn-hangzhou/b%20k%29/object?path=x"),
        (None, None, ""),
    ],
)
def test_links_are_http_only_and_their_parts_are_encoded(uri: str | None, region: str | None, expected: str) -> None:
    assert oss_console_url(uri, region) == expected


def test_a_non_http_uri_is_shown_but_never_linked(tmp_path: Path, engine: Engine) -> None:
    text = dingtalk_text(engine, {"URI": "javascript:alert(document.cookie)"})
    assert links(md.parse(text)) == [] and "javascript:alert(document.cookie)" in text
    doc = failed_event(1)
    doc["data"]["URI"] = "javascript:alert(1)"
    doc["aliyunregionid"] = "cn-hangzhou/../x"
    event = decode_object(doc)
    html = engine.templates.render_parts("email/task-failed.j2", ("html",), engine_context(engine, event))["html"]
    assert "href" not in html and "javascript:alert(1)" in html
