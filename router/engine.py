"""The routing core: a validated set of config, templates and rules, and what it makes of one event.

``load`` builds an Engine from the config file and fails with every problem found (file:line).
``Engine.route`` takes a decoded event to the notifications its matching rules produce. The service,
``route``, ``test`` and hot reload all use this one path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.channels.base import PayloadMeta
from router.config import Settings, load_settings
from router.decode import Event, Limits
from router.errors import ConfigError, RenderError
from router.notification import Notification
from router.render import TemplateSet
from router.rules import Notify, Rule, RuleSet, load_rules, rule_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderFailure:
    event_id: str
    rule: str
    channel: str
    reason: str

    def __str__(self) -> str:
        return f"event {self.event_id}: rule {self.rule} → {self.channel}: {self.reason}"


@dataclass
class RouteResult:
    notifications: list[Notification] = field(default_factory=list)
    failures: list[RenderFailure] = field(default_factory=list)


class Engine:
    def __init__(self, settings: Settings, templates: TemplateSet, rules: RuleSet) -> None:
        self.settings = settings
        self.templates = templates
        self.rules = rules
        self.limits = Limits(max_bytes=settings.max_event_bytes, max_depth=settings.max_event_depth)

    def route(self, event: Event) -> RouteResult:
        result = RouteResult()
        root = rule_root(event)
        matched = self.rules.match(event, root)
        if not matched:
            return result
        base = {"event": root["event"], "data": event.data, "imm": event.view}
        for rule in matched:
            context = {**base, "rule": _rule_doc(rule)}
            for target in rule.spec.notify:
                try:
                    result.notifications.append(self.render(event, rule, target, context))
                except RenderError as exc:
                    result.failures.append(RenderFailure(event.id, rule.name, target.channel, str(exc)))
        return result

    def render(self, event: Event, rule: Rule, target: Notify, context: dict[str, Any]) -> Notification:
        channel = self.settings.channels[target.channel]
        wanted = channel.required_blocks + channel.optional_blocks
        parts = self.templates.render_parts(target.template, wanted, {**context, "channel": target.channel})
        payload = channel.build_payload(parts, PayloadMeta(event_id=event.id, rule=rule.name))
        return Notification(
            event_id=event.id,
            event_type=event.type,
            rule=rule.name,
            channel=target.channel,
            template=target.template,
            severity=rule.spec.severity,
            payload=payload,
            summary=summary_line(event, rule),
            view=event.view,
        )

    def render_digest(self, channel_name: str, alerts: Sequence[Notification]) -> dict[str, Any]:
        """The payload of one digest message listing ``alerts`` (rate-limited notifications)."""
        channel = self.settings.channels[channel_name]
        template = channel.digest_template or channel.default_digest_template
        context = {
            "alerts": [
                {
                    "summary": n.summary,
                    "rule": n.rule,
                    "severity": n.severity,
                    "event_id": n.event_id,
                    "event_type": n.event_type,
                    "imm": n.view,
                }
                for n in alerts
            ],
            "count": len(alerts),
            "channel": channel_name,
            "rules": sorted({n.rule for n in alerts}),
        }
        wanted = channel.required_blocks + channel.optional_blocks
        parts = self.templates.render_parts(template, wanted, context)
        digest_id = f"digest:{alerts[0].event_id}+{len(alerts) - 1}" if alerts else "digest"
        return channel.build_payload(parts, PayloadMeta(event_id=digest_id, rule="digest"))


def summary_line(event: Event, rule: Rule) -> str:
    view = event.view
    bits = [f"[{rule.spec.severity}]", rule.name, view.get("task_type") or event.type]
    bits += [str(v) for v in (view.get("project"), view.get("task_id"), view.get("error_code")) if v]
    moderation = view.get("moderation")
    if moderation and moderation.get("suggestion"):
        bits.append(f"suggestion={moderation['suggestion']}")
    return " ".join(bits)


def _rule_doc(rule: Rule) -> dict[str, Any]:
    spec = rule.spec
    return {"name": spec.name, "description": spec.description, "severity": spec.severity, "labels": spec.labels}


def build(settings: Settings) -> Engine:
    """Compile templates and rules for ``settings``, checking every cross-reference."""
    problems: list[str] = []
    try:
        templates = TemplateSet(settings.templates_dir, settings.timezone)
    except ConfigError as exc:
        raise ConfigError(f"templates:\n{exc}") from exc
    for name, channel in settings.channels.items():
        digest = channel.digest_template or channel.default_digest_template
        problem = templates.check_for(digest, channel)
        if problem:
            problems.append(f"channel {name!r}: digest {problem}")

    def check_notify(target: Notify) -> str | None:
        channel = settings.channels.get(target.channel)
        if channel is None:
            known = ", ".join(sorted(settings.channels)) or "none are configured"
            return f"unknown channel {target.channel!r}; channels in the config: {known}"
        return templates.check_for(target.template, channel)

    try:
        rules = load_rules(settings.rules_dir, check_notify)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return Engine(settings, templates, rules)


def load(config_path: Path) -> Engine:
    return build(load_settings(config_path))
