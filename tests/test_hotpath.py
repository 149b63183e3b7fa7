"""Nothing parses per event: after one pass over the seed events, routing them again (rules, alert templates,
group keys, group and digest messages) makes no JMESPath parse and no Jinja compile."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jmespath.parser import Parser

from router.decode import Event, iter_events
from router.engine import Engine, group_facts, group_template, load
from tests.test_rules import event, make, rule

ROOT = Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "tests" / "events").rglob("*.json"))


def seed_events() -> list[Event]:
    return [e for path in SEEDS for e in iter_events(path.name, path.read_bytes()) if isinstance(e, Event)]


def route_all(engine: Engine, events: list[Event]) -> Counter[str]:
    """Route every event as the service does: match and render alerts, read the group keys of managed
    targets, and render one group message per target and one digest per channel; what was done, counted."""
    done: Counter[str] = Counter()
    alerts: dict[str, list[Any]] = {}
    for seed in events:
        result = engine.route(seed)
        done["notifications"] += len(result.notifications)
        for notification in result.notifications:
            alerts.setdefault(notification.channel, []).append(notification)
            target = engine.targets[notification.rule, notification.channel, notification.template]
            keys = target.group_by or (target.throttle.key if target.throttle else ())
            if not keys:
                continue
            values = engine.values(keys, result.root)
            facts = group_facts(
                "group" if target.group_by else "throttle",
                dict(zip(keys, values, strict=True)),
                engine.rule_docs[notification.rule],
                "2026-11-02T10:00:00+00:00",
                "2026-11-02T10:05:00+00:00",
                1,
                1,
                1,
            )
            channel = engine.settings.channels[notification.channel]
            engine.render_group(notification.channel, group_template(channel, target), [notification], facts)
            done["groups"] += 1
    for channel, listed in alerts.items():
        engine.render_digest(channel, listed)
        done["digests"] += 1
    return done


@pytest.fixture
def count_parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Calls of jmespath's parser and of Jinja's compile and parse (the sandbox goes through both)."""
    calls: Counter[str] = Counter()

    def counting(owner: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[f"{owner.__name__}.{name}"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counting(Parser, "parse")
    counting(jinja2.Environment, "compile")
    counting(jinja2.Environment, "_parse")
    yield calls


def test_routing_after_warm_up_parses_and_compiles_nothing(engine: Engine, count_parses: Counter[str]) -> None:
    events = seed_events()
    warm = route_all(engine, events)
    assert warm["notifications"] > 20 and warm["groups"] > 5 and warm["digests"] >= 2  # every path was taken
    count_parses.clear()
    assert route_all(engine, events) == warm
    assert count_parses == Counter()


def test_the_counters_see_what_loading_parses(example_env: dict[str, str], count_parses: Counter[str]) -> None:
    """The wrapped functions are the ones loading goes through, so a parse per event would be counted."""
    load(ROOT / "router.example.yaml")
    assert count_parses["Parser.parse"] > 10
    assert count_parses["Environment.compile"] > 10
    assert count_parses["Environment._parse"] > 10


def test_included_templates_are_not_compiled_again_when_their_file_changes(
    tmp_path: Path, count_parses: Counter[str]
) -> None:
    """Included and imported templates come from what was compiled at load: a file edited since takes effect
    at the next reload of the whole set (checked then), not by a compile in the middle of routing."""
    templates = {
        "t.j2": "{% block value %}{% include 'part.j2' %} {% from 'm.j2' import shout %}{{ shout(rule.name) }}"
        "{% endblock %}",
        "part.j2": "included",
        "m.j2": "{% macro shout(s) %}{{ s | upper }}{% endmacro %}",
    }
    engine = load(make(tmp_path, "rules:\n" + rule("a", "`true`"), templates))
    ev = event({})
    assert [n.payload["value"] for n in engine.route(ev).notifications] == ["included A"]
    for name in ("part.j2", "m.j2"):
        path = tmp_path / "templates" / name
        path.write_text(path.read_text().replace("included", "edited").replace("upper", "lower"))
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    count_parses.clear()
    assert [n.payload["value"] for n in engine.route(ev).notifications] == ["included A"]
    assert count_parses == Counter()
