"""The routing core: a validated set of config, templates and rules, and what it makes of one event.

``load`` builds an Engine from the config file and fails with every problem found (file:line).
``Engine.route`` takes a decoded event to the notifications its matching rules produce. The service,
``route``, ``test`` and hot reload all use this one path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jmespath.exceptions import JMESPathError

from router.channels.base import ChannelConfigBase, PayloadMeta
from router.channels.registry import channel_types
from router.config import Settings, load_settings
from router.decode import Event, Limits, decode_object
from router.errors import ConfigError, RenderError
from router.expr import truthy
from router.imm import KNOWN_EVENT_TYPES, example_payloads
from router.notification import Notification
from router.opsfile import line_of, load_yaml
from router.render import TemplateSet, template_set
from router.rules import (
    EVAL_ERRORS,
    Notify,
    Rule,
    RuleSet,
    RuleSpec,
    compile_expression,
    load_rules,
    rule_root,
    search,
)

log = logging.getLogger(__name__)

# The names each kind of template render sees (below, and the alert manager's group facts); ``check``
# reports any other name a template uses.
EVENT_CONTEXT = frozenset({"event", "data", "imm", "rule", "channel"})
DIGEST_CONTEXT = frozenset({"alerts", "count", "channel", "rules"})
GROUP_CONTEXT = DIGEST_CONTEXT | {"more", "kind", "group", "rule", "first", "last", "part", "parts", "message_number"}


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
    matched: list[str] = field(default_factory=list)  # rule names
    root: dict[str, Any] = field(default_factory=dict)  # what the rules saw


class Engine:
    def __init__(
        self,
        settings: Settings,
        templates: TemplateSet,
        rules: RuleSet,
        expressions: dict[str, Any] | None = None,
        warnings: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        # ``file:line: …`` for what loads but would not work as meant (``check --strict`` refuses them).
        self.warnings = tuple(warnings)
        self.templates = templates
        self.rules = rules
        self.limits = Limits(max_bytes=settings.max_event_bytes, max_depth=settings.max_event_depth)
        # group_by, throttle keys and inhibit `equal`: compiled once at load, by expression text.
        self.expressions = expressions or {}
        self.intervals = {interval.name: interval for interval in settings.time_intervals}
        self.targets = {(r.name, t.channel, t.template): t for r in rules.rules for t in r.spec.notify}
        self.rule_docs = {r.name: rule_doc(r.spec) for r in rules.rules}
        # rule name → the inhibit rules it is a source of
        self.inhibit_sources: dict[str, list[int]] = {}
        for index, inhibit in enumerate(settings.inhibit_rules):
            for name in inhibit.source_rules:
                self.inhibit_sources.setdefault(name, []).append(index)

    def values(self, expressions: Sequence[str], root: dict[str, Any]) -> tuple[Any, ...]:
        """The values of compiled key expressions on a rule root (an evaluation error gives null)."""
        out = []
        for text in expressions:
            try:
                out.append(search(self.expressions[text], root))
            except (JMESPathError, TypeError, ValueError, RecursionError):
                out.append(None)
        return tuple(out)

    def route(self, event: Event) -> RouteResult:
        root = self.rules.root_for(event)
        matched = self.rules.match(event, root)
        if not matched:
            return RouteResult(root=root)
        # Templates, group and throttle keys and the notify stage read all of the root.
        result = RouteResult(matched=[rule.name for rule in matched], root=rule_root(event))
        for rule in matched:
            context = event_context(event, result.root["event"], self.rule_docs[rule.name])
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
        payload = channel.build_payload(parts, PayloadMeta(event_id=event.id, rule=rule.name, time=event.time))
        return Notification(
            event_id=event.id,
            event_type=event.type,
            rule=rule.name,
            channel=target.channel,
            template=target.template,
            severity=rule.spec.severity,
            payload=payload,
            summary=summary_line(event, rule.name, rule.spec.severity),
            view=event.view,
        )

    def render_digest(self, channel_name: str, alerts: Sequence[Notification]) -> dict[str, Any]:
        """The payload of one digest message listing ``alerts`` (rate-limited notifications)."""
        channel = self.settings.channels[channel_name]
        template = channel.digest_template or channel.default_digest_template
        wanted = channel.required_blocks + channel.optional_blocks
        parts = self.templates.render_parts(template, wanted, digest_context(channel_name, alerts))
        digest_id = f"digest:{alerts[0].event_id}+{len(alerts) - 1}" if alerts else "digest"
        return channel.build_payload(parts, PayloadMeta(event_id=digest_id, rule="digest"))

    def render_group(
        self, channel_name: str, template: str, alerts: Sequence[Notification], facts: dict[str, Any]
    ) -> dict[str, Any]:
        """The payload of one group or throttle-summary message (``facts``: see ``group_facts``); alerts
        beyond the channel's ``digest_max_alerts`` are counted, and their ids listed, as "and N more"."""
        channel = self.settings.channels[channel_name]
        context = group_context(channel_name, alerts, facts, channel.digest_max_alerts)
        wanted = channel.required_blocks + channel.optional_blocks
        parts = self.templates.render_parts(template, wanted, context)
        first = alerts[0].event_id if alerts else "group"
        return channel.build_payload(parts, PayloadMeta(event_id=f"group:{first}+{len(alerts) - 1}", rule="group"))


def event_context(event: Event, event_doc: dict[str, Any], rule: dict[str, Any]) -> dict[str, Any]:
    """What an alert template sees (EVENT_CONTEXT, ``channel`` added per target)."""
    return {"event": event_doc, "data": event.data, "imm": event.view, "rule": rule}


def digest_context(channel_name: str, alerts: Sequence[Notification]) -> dict[str, Any]:
    """What a digest template sees (DIGEST_CONTEXT)."""
    return {
        "alerts": [_alert_doc(n) for n in alerts],
        "count": len(alerts),
        "channel": channel_name,
        "rules": sorted({n.rule for n in alerts}),
    }


def group_facts(
    kind: str,
    group: dict[str, Any],
    rule: dict[str, Any],
    first: str,
    last: str,
    part: int,
    parts: int,
    number: int,
) -> dict[str, Any]:
    """A group's or throttle summary's facts: its key values, rule, first/last alert times (ISO), which
    part of how many parts, and the how-manieth message of the group this is."""
    return {
        "kind": kind,
        "group": group,
        "rule": rule,
        "first": first,
        "last": last,
        "part": part,
        "parts": parts,
        "message_number": number,
    }


def group_context(
    channel_name: str, alerts: Sequence[Notification], facts: dict[str, Any], limit: int
) -> dict[str, Any]:
    """What a group template sees (GROUP_CONTEXT): the facts, and the digest context of the first
    ``limit`` alerts, with the ids of the rest as ``more``."""
    return {
        **facts,
        **digest_context(channel_name, alerts[:limit]),
        "more": [n.event_id for n in alerts[limit:]],
        "count": len(alerts),
        "rules": sorted({n.rule for n in alerts}),
    }


def _alert_doc(n: Notification) -> dict[str, Any]:
    return {
        "summary": n.summary,
        "rule": n.rule,
        "severity": n.severity,
        "event_id": n.event_id,
        "event_type": n.event_type,
        "imm": n.view,
    }


def summary_line(event: Event, rule: str, severity: str) -> str:
    view = event.view
    bits = [f"[{severity}]", rule, view.get("task_type") or event.type]
    if not event.type.startswith("imm:") and event.subject:
        bits.append(event.subject)  # an Alertmanager alert's alertname; IMM subjects only repeat the project
    bits += [str(v) for v in (view.get("project"), view.get("task_id"), view.get("error_code")) if v]
    moderation = view.get("moderation")
    if moderation and moderation.get("suggestion"):
        bits.append(f"suggestion={moderation['suggestion']}")
    return " ".join(bits)


def rule_doc(spec: RuleSpec | None, name: str = "", severity: str = "warning") -> dict[str, Any]:
    """What templates see as ``rule``; without a spec (a rule gone after a reload, ``render``), a bare one."""
    if spec is None:
        return {"name": name, "description": "", "severity": severity, "labels": {}}
    return {"name": spec.name, "description": spec.description, "severity": spec.severity, "labels": spec.labels}


def group_template(channel: ChannelConfigBase, target: Notify) -> str:
    return target.group_template or f"group/{getattr(channel, 'type', 'generic')}.j2"


def build(settings: Settings, config_path: Path | None = None) -> Engine:
    """Compile templates and rules for ``settings``, checking every cross-reference."""
    problems: list[str] = []
    expressions: dict[str, Any] = {}

    def compile_keys(texts: Sequence[str], what: str) -> str | None:
        for text in texts:
            if text not in expressions:
                try:
                    expressions[text] = compile_expression(text, what=f"{what} entry {text!r}")
                except ConfigError as exc:
                    return str(exc)
        return None

    try:
        templates = template_set(settings)
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
        problem = templates.check_for(target.template, channel)
        if problem is None and target.managed:
            problem = templates.check_for(group_template(channel, target), channel)
            if problem is not None:
                problem = f"group_template: {problem}"
        if problem is None and target.group_by is not None:
            problem = compile_keys(target.group_by, "group_by")
        if problem is None and target.throttle is not None:
            problem = compile_keys(target.throttle.key, "throttle.key")
        for field, names in (("active", target.active_time_intervals), ("mute", target.mute_time_intervals)):
            unknown = [n for n in names if n not in intervals]
            if problem is None and unknown:
                known = ", ".join(sorted(intervals)) or "none are defined"
                problem = (
                    f"{field}_time_intervals: unknown interval {unknown[0]!r}; time_intervals in the config: {known}"
                )
        return problem

    intervals = {interval.name for interval in settings.time_intervals}
    if len(intervals) != len(settings.time_intervals):
        problems.append(_at(config_path, ("time_intervals",), "time interval names must be unique"))

    try:
        rules = load_rules(settings.rules_dir, check_notify)
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        known_rules = {r.name for r in rules.rules}
        for i, inhibit in enumerate(settings.inhibit_rules):
            for field in ("source_rules", "target_rules"):
                unknown = [n for n in getattr(inhibit, field) if n not in known_rules]
                if unknown:
                    problems.append(
                        _at(
                            config_path,
                            ("inhibit_rules", i, field),
                            f"inhibit_rules[{i}].{field}: unknown rule {unknown[0]!r}; "
                            f"rules: {', '.join(sorted(known_rules))}",
                        )
                    )
            problem = compile_keys(inhibit.equal, f"inhibit_rules[{i}].equal")
            if problem:
                problems.append(_at(config_path, ("inhibit_rules", i, "equal"), problem))
    if problems:
        raise ConfigError("\n".join(problems))
    engine = Engine(settings, templates, rules, expressions)
    problems, warnings = _check_templates(engine)
    if problems:
        raise ConfigError("\n".join(problems))
    plugins = [f"plugin not loaded: {problem}" for problem in channel_types()[1]]
    return Engine(settings, templates, rules, expressions, [*rules.warnings, *warnings, *plugins])


def _check_templates(engine: Engine) -> tuple[list[str], list[str]]:
    """Every template as it is used: names its render does not define are errors (found in the source);
    then each is rendered for the example events (full, and with only what makes them fail) of every type
    that its rule takes and matches, and group/digest templates for a list of those alerts. A render that
    fails is a warning naming the template line and the events it fails for."""
    templates, settings = engine.templates, engine.settings
    uses: dict[str, frozenset[str]] = {}
    for rule in engine.rules.rules:
        for target in rule.spec.notify:
            uses[target.template] = EVENT_CONTEXT
            if target.managed:
                uses[group_template(settings.channels[target.channel], target)] = GROUP_CONTEXT
    for channel in settings.channels.values():
        uses[channel.digest_template or channel.default_digest_template] = DIGEST_CONTEXT
    problems = [p for name, context in sorted(uses.items()) for p in templates.undefined_names(name, context)]
    if problems:
        return problems, []

    failures: dict[str, list[str]] = {}  # "file:line: template …: reason" → the examples it failed for

    def attempt(what: str, render: Callable[..., Any], *args: Any) -> Any:
        try:
            return render(*args)
        except Exception as exc:  # whatever a render raises is what this check reports
            place = templates.location(exc.__cause__ or exc)
            where = f"{place[0]}:{place[1]}: " if place else ""
            reason = str(exc) if isinstance(exc, RenderError) else f"{type(exc).__name__}: {exc}"
            failures.setdefault(f"{where}{reason}", []).append(what)
            return None

    examples = {  # event type → (label, shape, event, rule root)
        event_type: [
            (f"{event_type} ({kind})", _shape(event, kind), event, rule_root(event))
            for kind, data in example_payloads(event_type).items()
            for event in [example_event(event_type, data)]
        ]
        for event_type in sorted(KNOWN_EVENT_TYPES)
    }
    # (channel, template, shape) → its alert: one render per payload shape, not per task type
    rendered: dict[tuple[str, str, str], Notification] = {}
    roots: dict[str, dict[str, Any]] = {}  # rule → the root of its first example, for group keys
    types: dict[tuple[str, ...] | None, list[str]] = {}  # events patterns → the example types they take
    for rule in engine.rules.rules:
        patterns = rule.spec.events
        if patterns not in types:
            types[patterns] = [t for t in examples if rule.applies_to(t)]
        for event_type in types[patterns]:
            for label, shape, event, root in examples[event_type]:
                pending = [t for t in rule.spec.notify if (t.channel, t.template, shape) not in rendered]
                if not pending:
                    continue
                fitted, fitted_root = _fitted(event, root, engine.rules.implied(rule))
                try:
                    if not truthy(search(rule.expression, fitted_root)):
                        continue
                except EVAL_ERRORS:
                    continue
                roots.setdefault(rule.name, fitted_root)
                context = event_context(fitted, fitted_root["event"], engine.rule_docs[rule.name])
                for target in pending:
                    made = attempt(label, engine.render, fitted, rule, target, context)
                    if made is not None:
                        rendered[(target.channel, target.template, shape)] = made
    alerts: dict[tuple[str, str], list[Notification]] = {}  # (channel, rule) → a few of its alerts
    for (channel_name, _, _), notification in rendered.items():
        alerts.setdefault((channel_name, notification.rule), []).append(notification)
    for name in settings.channels:
        some = [n for (c, _), listed in alerts.items() if c == name for n in listed][:3]
        attempt("a digest", engine.render_digest, name, some)
    for rule in engine.rules.rules:
        for target in (t for t in rule.spec.notify if t.managed):
            keys = target.group_by or (target.throttle.key if target.throttle else ())
            facts = group_facts(
                "group" if target.group_by is not None else "throttle",
                dict(zip(keys, engine.values(keys, roots.get(rule.name, {})), strict=True)),
                engine.rule_docs[rule.name],
                "2026-01-01T00:00:00+00:00",
                "2026-01-01T00:05:00+00:00",
                1,
                1,
                1,
            )
            template = group_template(settings.channels[target.channel], target)
            listed = alerts.get((target.channel, rule.name), [])[:3]
            attempt(f"a group of rule {rule.name}", engine.render_group, target.channel, template, listed, facts)
    warnings = []
    for failure, cases in failures.items():
        shown = ", ".join(cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
        warnings.append(f"{failure} (for {shown}); a real event like that would lose its alert")
    return [], warnings


def _shape(event: Event, kind: str) -> str:
    """What tells example payloads apart: their family (imm:Task, imm:FileMeta, …), whether they carry a
    moderation result, and full or minimal. Task types differ only in their name."""
    family = event.type.rsplit(":", 1)[0]
    return f"{family}{'+moderation' if event.view.get('moderation') else ''} ({kind})"


def _fitted(
    event: Event, root: dict[str, Any], implied: dict[tuple[str, ...], frozenset[str]]
) -> tuple[Event, dict[str, Any]]:
    """An example event given the values a rule's ``when`` requires (``imm.project == 'prod'``), so that
    rules about one project or code are checked too. Only existing mappings get a value: an example
    without ``imm.moderation`` stays without it."""
    if not implied:
        return event, root
    fitted: dict[str, Any] = dict(root)
    for path, values in implied.items():
        node: Any = fitted
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node[key] = node = dict(child)  # copies: the example is shared by every rule
        else:
            node[path[-1]] = min(values)
    data = {k: v for k, v in fitted.items() if k not in ("imm", "event")}
    return replace(event, data=data, _view=fitted["imm"], _facts=None), fitted


def _at(config_path: Path | None, loc: tuple[int | str, ...], message: str) -> str:
    """``file:line: message`` for a place in the config file (its line looked up again)."""
    if config_path is None:
        return message
    try:
        line = line_of(load_yaml(config_path), loc)
    except ConfigError:
        line = None
    return str(ConfigError(message, path=str(config_path), line=line))


def example_event(event_type: str, data: dict[str, Any]) -> Event:
    """An EventBridge event of ``event_type`` carrying ``data`` (see ``example_payloads``)."""
    return decode_object(
        {
            "specversion": "1.0",
            "id": f"example-{event_type}",
            "source": "acs.imm",
            "type": event_type,
            "subject": "acs.imm:cn-hangzhou:1234567890:example-project",
            "time": "2026-01-01T00:00:05+08:00",
            "aliyunregionid": "cn-hangzhou",
            "data": data,
        },
        source="example event",
    )


def load(config_path: Path) -> Engine:
    return build(load_settings(config_path), config_path)
