"""Every shipped template renders, and builds its channel's payload, for every event shape the `imm` view
allows: each example event, and each with one of its payload fields (at any depth) missing.
Group and digest templates render for lists of those alerts."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.channels.base import ChannelConfigBase, PayloadMeta
from router.decode import Event, decode_object, iter_events
from router.engine import Engine, summary_line
from router.notification import Notification
from tests.test_delivery_support import make_engine

ROOT = Path(__file__).resolve().parent.parent
EVENTS = sorted((ROOT / "tests" / "events").rglob("*.json"))
CHANNELS: dict[str, dict[str, Any]] = {
    "dingtalk": {"type": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=T"},
    "email": {"type": "email", "host": "smtp.example.com", "from": "a@example.com", "to": ["b@example.com"]},
    "kafka": {"type": "kafka", "topic": "alerts"},
    "webhook": {"type": "webhook", "url": "https://hooks.example.com/imm"},
    "alertmanager": {"type": "alertmanager", "url": "http://alertmanager:9093"},
}
META = PayloadMeta(event_id="ev-1", rule="r")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tmp_path_factory.mktemp("shipped"), CHANNELS, timezone="Asia/Shanghai")


def _paths(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every key path in a payload, at any depth (the first item standing for each list)."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list) and value:
        yield from _paths(value[0], (*prefix, 0))


def _without_each_field(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in _paths(doc):
        smaller = copy.deepcopy(doc)
        parent: Any = smaller
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        yield ".".join(map(str, path)), smaller


def event_shapes() -> list[tuple[str, Event]]:
    shapes = []
    for path in EVENTS:
        for event in iter_events(path.name, path.read_bytes()):
            assert isinstance(event, Event), event
            shapes.append((path.name, event))
            for missing, data in _without_each_field(event.data):
                doc = {**event.envelope, "specversion": "1.0", "type": event.type, "data": data}
                shapes.append((f"{path.name} without {missing}", decode_object(doc)))
    return shapes


SHAPES = event_shapes()


def channel_of(engine: Engine, template: str) -> tuple[str, ChannelConfigBase]:
    kind = template.split("/")[-1].split(".")[0] if template.split("/")[0] in ("digest", "group") else template
    for name in CHANNELS:
        if kind.startswith(name):
            return name, engine.settings.channels[name]
    raise AssertionError(f"no channel type for {template}")


def alert_templates(engine: Engine) -> list[str]:
    return [n for n in engine.templates.names() if n.split("/")[0] not in ("digest", "group")]


def test_there_are_many_shapes_and_every_template_is_covered(engine: Engine) -> None:
    assert len(SHAPES) > 500
    assert len(alert_templates(engine)) >= 10
    assert {"digest/dingtalk.j2", "group/webhook.j2"} <= set(engine.templates.names())


@pytest.mark.parametrize("severity", ["critical", "warning"])
def test_every_alert_template_renders_every_event_shape(engine: Engine, severity: str) -> None:
    problems = []
    for template in alert_templates(engine):
        name, channel = channel_of(engine, template)
        if template.endswith("base.j2") or template.endswith("base.md.j2"):
            continue  # rendered through its children
        for label, event in SHAPES:
            context = {
                "event": event.event_doc(),
                "data": event.data,
                "imm": event.view,
                "rule": {"name": "r", "description": "d", "severity": severity, "labels": {}},
                "channel": name,
            }
            try:
                parts = engine.templates.render_parts(
                    template, channel.required_blocks + channel.optional_blocks, context
                )
                channel.build_payload(parts, META)
            except Exception as exc:
                problems.append(f"{template} with {label}: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} in all)"


def test_group_and_digest_templates_render_lists_of_every_shape(engine: Engine) -> None:
    alerts = [
        Notification(
            event_id=event.id,
            event_type=event.type,
            rule="r",
            channel="c",
            template="t",
            severity="warning",
            payload={},
            summary=summary_line(event, engine.rules.rules[0].name, engine.rules.rules[0].spec.severity),
            view=event.view,
        )
        for _, event in SHAPES
    ]
    facts = {
        "kind": "group",
        "group": {"imm.project": None, "imm.error_code": "E"},
        "rule": {"name": "r", "severity": "critical"},
        "first": "2026-11-02T10:00:00+00:00",
        "last": "2026-11-02T10:05:00+00:00",
        "part": 1,
        "parts": 2,
        "message_number": 1,
    }
    for name in CHANNELS:
        for size in (1, 7, len(alerts)):
            engine.render_digest(name, alerts[:size])
            for kind in ("group", "throttle"):
                engine.render_group(name, f"group/{name}.j2", alerts[:size], {**facts, "kind": kind})
