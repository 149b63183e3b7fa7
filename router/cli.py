"""``imm-router`` commands. Each exits non-zero on failure with a message a person can act on."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from router import __version__, jsoncodec
from router.channels.registry import BUILT_IN, channel_types
from router.config import Settings, load_settings
from router.decode import Limits, iter_events
from router.engine import (
    Engine,
    digest_context,
    event_context,
    group_context,
    group_facts,
    load,
    rule_doc,
    summary_line,
)
from router.errors import ConfigError, DecodeError, RouterError
from router.notification import Notification
from router.render import template_set
from router.rules import Rule

if TYPE_CHECKING:
    from router.alerting.silences import SilenceStore

log = logging.getLogger("router")


def read_inputs(paths: Sequence[str], stdin: TextIO) -> Iterator[tuple[str, bytes]]:
    for path in paths or ["-"]:
        if path == "-":
            yield "<stdin>", stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
        else:
            try:
                yield path, Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read input: {exc.strerror}", path=path) from None


def cmd_check(args: argparse.Namespace) -> int:
    engine = load(args.config)
    settings = engine.settings
    for warning in engine.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.strict and engine.warnings:
        print(f"error: {len(engine.warnings)} warning(s) and --strict: fix them", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{name} ({ch.type})" for name, ch in sorted(settings.channels.items()))
    files = sorted({str(r.path) for r in engine.rules.rules})
    warned = f" ({len(engine.warnings)} warning(s) above)" if engine.warnings else ""
    print(f"config OK: {args.config}{warned}")
    print(f"  channels:  {len(settings.channels)}: {kinds or 'none'}")
    print(f"  rules:     {len(engine.rules.rules)} in {len(files)} file(s) under {settings.rules_dir}")
    print(f"  templates: {len(engine.templates.text)} under {settings.templates_dir}")
    types = channel_types()[0]  # the plugins that could not be loaded are among the warnings
    built_in = ", ".join(sorted(name for name, t in types.items() if t.origin == BUILT_IN))
    print(f"  channel types: {built_in} (built in)")
    for name, kind in sorted(types.items()):
        if kind.origin != BUILT_IN:
            print(f"                 {name} (plugin: {kind.origin})")
    if args.live:
        from router.delivery.health import check_live

        return int(asyncio.run(check_live(engine)))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    engine = load(args.config)
    if args.explain:
        from router.alerting.explain import explain

        return explain(engine, read_inputs(args.inputs, sys.stdin), sys.stdout)
    failed = False
    out = sys.stdout
    broken: list[Rule] = []  # rules that raised on the current event
    engine.rules.on_error = broken.append
    for name, raw in read_inputs(args.inputs, sys.stdin):
        for item in iter_events(name, raw, engine.limits):
            if isinstance(item, DecodeError):
                failed = True
                print(f"error: {item}", file=sys.stderr)
                continue
            broken.clear()
            result = engine.route(item)
            for rule in broken:
                failed = True
                print(
                    f"error: event {item.id}: rule {rule.name} ({rule.path}:{rule.line}) could not be evaluated "
                    "and was treated as not matching",
                    file=sys.stderr,
                )
            for notification in result.notifications:
                out.write(jsoncodec.dumps(notification.route_line()).decode() + "\n")
            for error in result.failures:
                failed = True
                print(f"error: {error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_test(args: argparse.Namespace) -> int:
    from router.ruletest import run_rule_tests

    engine = load(args.config)
    return run_rule_tests(engine, [Path(p) for p in args.files], sys.stdout)


def cmd_render(args: argparse.Namespace) -> int:
    config: Path = args.config
    settings = load_settings(config) if config.exists() or args.config_given else Settings()
    templates = template_set(settings)
    if args.template not in templates.text:
        raise ConfigError(f"template {args.template!r} not found under {settings.templates_dir}")
    limits = Limits(settings.max_event_bytes, settings.max_event_depth)
    status = 0
    events = []
    for name, raw in read_inputs(args.events, sys.stdin):
        for event in iter_events(name, raw, limits):
            if isinstance(event, DecodeError):
                print(f"error: {event}", file=sys.stderr)
                status = 1
            else:
                events.append(event)
    if args.digest or args.group:
        # The events are the alerts of one digest or group message, as the service would list them.
        alerts = [
            Notification(
                event_id=e.id,
                event_type=e.type,
                rule=args.rule,
                channel="render",
                template=args.template,
                severity=args.severity,
                payload={},
                summary=summary_line(e, args.rule, args.severity),
                view=e.view,
            )
            for e in events
        ]
        if args.digest:
            contexts = [digest_context("render", alerts)]
        else:
            times = sorted(e.time.isoformat() for e in events) or [""]
            facts = group_facts("group", {}, rule_doc(None, args.rule, args.severity), times[0], times[-1], 1, 1, 1)
            contexts = [group_context("render", alerts, facts, limit=len(alerts))]
    else:
        rule = rule_doc(None, args.rule, args.severity)
        contexts = [event_context(e, e.event_doc(), rule) | {"channel": "render"} for e in events]
    blocks = tuple(sorted(templates.blocks(args.template)))
    for context in contexts:
        for block, text in templates.render_parts(args.template, blocks, context).items():
            print(f"--- {block} ---\n{text}\n")
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from router.service import run_service

    return asyncio.run(run_service(args.config))


def cmd_replay(args: argparse.Namespace) -> int:
    from router.sources.replay import replay

    return asyncio.run(replay(args.config, source=args.file, match=args.match, dry_run=args.dry_run, limit=args.limit))


def cmd_demo(args: argparse.Namespace) -> int:
    from router.embedded.demo import run_demo

    return asyncio.run(run_demo(args.outbox, exit_after=args.exit))


# --- silences -------------------------------------------------------------------------------------


def cmd_silence(args: argparse.Namespace) -> int:
    engine = load(args.config)
    if args.action == "add":
        fields = _silence_fields(args, engine)
        return asyncio.run(_silence(engine, lambda store: _silence_add(store, fields)))
    if args.action == "list":
        return asyncio.run(_silence(engine, lambda store: _silence_list(store, engine.settings.timezone)))
    return asyncio.run(_silence(engine, lambda store: _silence_expire(store, args.id)))


def _silence_fields(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    """Check ``silence add``'s options against the config before touching Kafka (ConfigError: exit 2)."""
    from datetime import UTC, datetime, timedelta

    from router.alerting.silences import check_names
    from router.alerting.timing import parse_duration
    from router.rules import compile_expression

    compile_expression(args.match, what="--match")
    check_names(args.rule, args.channel, [r.name for r in engine.rules.rules], list(engine.settings.channels))
    now = datetime.now(UTC)
    if args.until is not None:
        try:
            ends_at = datetime.fromisoformat(args.until)
        except ValueError:
            raise ConfigError(
                f"--until {args.until!r} is not an ISO 8601 time, e.g. 2026-12-01T08:00:00+08:00"
            ) from None
        if ends_at.tzinfo is None:
            raise ConfigError(f"--until {args.until!r} has no time zone: add one, e.g. 2026-12-01T08:00:00+08:00")
        if ends_at <= now:
            raise ConfigError(f"--until {args.until} is in the past (now {now.isoformat(timespec='seconds')})")
    else:
        try:
            seconds = parse_duration(args.for_)
        except ValueError as exc:
            raise ConfigError(f"--for: {exc}") from None
        if seconds <= 0:
            raise ConfigError(f"--for {args.for_!r} must be longer than nothing, e.g. 2h")
        ends_at = now + timedelta(seconds=seconds)
    for name in ("comment", "author"):
        if not getattr(args, name).strip():
            raise ConfigError(f"--{name} is empty")
    return {
        "match": args.match,
        "rule": args.rule,
        "channel": args.channel,
        "ends_at": ends_at,
        "comment": args.comment,
        "author": args.author,
    }


async def _silence(engine: Engine, action: Callable[[SilenceStore], Awaitable[int]]) -> int:
    """Run ``action(store)`` with a SilenceStore that has read the whole silences topic."""
    from aiokafka.errors import KafkaError

    from router.alerting.silences import SilenceStore

    kafka = engine.settings.kafka
    store = SilenceStore(kafka.client_options(), kafka.silences_topic, replication_factor=kafka.replication_factor)
    try:
        await store.start()
        try:
            await asyncio.wait_for(store.caught_up.wait(), 30)
        except TimeoutError:
            raise RouterError(
                f"could not read topic {kafka.silences_topic} from Kafka at {kafka.bootstrap_servers} within 30s"
            ) from None
        return await action(store)
    except KafkaError as exc:
        raise RouterError(f"Kafka at {kafka.bootstrap_servers}: {exc}") from None  # str names the error type
    finally:
        await store.stop()


async def _silence_add(store: SilenceStore, fields: dict[str, Any]) -> int:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    for same in store.silences.same_as(fields["match"], fields["rule"], fields["channel"], now):
        print(
            f"note: silence {same.id} by {same.author} already silences this until "
            f"{same.ends_at.isoformat(timespec='seconds')} ({same.comment}); adding another",
            file=sys.stderr,
        )
    silence = await store.add(**fields)
    print(silence.id)
    return 0


async def _silence_list(store: SilenceStore, timezone: str) -> int:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from router.alerting.timing import format_duration

    now = datetime.now(UTC)
    zone = ZoneInfo(timezone)
    silences = store.silences.listing(now)
    if not silences:
        print("no active or pending silences (and none expired in the last day)")
        return 0

    def when(moment: datetime) -> str:
        ahead = (moment - now).total_seconds()
        # Seconds only matter for the last minutes: round to minutes past an hour, hours past a day.
        unit = 3_600 if abs(ahead) >= 86_400 else 60 if abs(ahead) >= 3_600 else 1
        span = format_duration(round(abs(ahead) / unit) * unit)
        return f"{moment.astimezone(zone):%Y-%m-%d %H:%M} ({'in ' + span if ahead > 0 else span + ' ago'})"

    rows = [("ID", "STATE", "STARTS", "ENDS", "RULE", "CHANNEL", "MATCH", "AUTHOR", "COMMENT")]
    for s in silences:
        state = s.state(now)
        rows.append(
            (
                s.id,
                "EXPIRED" if state == "expired" else state,
                when(s.starts_at),
                when(s.ends_at),
                s.rule or "*",
                s.channel or "*",
                s.match,
                s.author,
                s.comment,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    print(f"(times in {timezone}; rule or channel * = any)")
    return 0


async def _silence_expire(store: SilenceStore, silence_id: str) -> int:
    silence = await store.expire(silence_id)
    print(f"expired {silence.id} ({silence.match})")
    return 0


def add_silence_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("silence", help="add, list and expire silences (shared by every replica through Kafka)")
    actions = group.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=Path("router.yaml"), help="config file (router.yaml)")
        p.set_defaults(func=cmd_silence)
        return p

    p = action("add", "silence the alerts matching a condition for a while; prints the new silence's id")
    p.add_argument(
        "--match", required=True, help="JMESPath on what a rule's `when` sees, e.g. \"imm.project == 'staging'\""
    )
    p.add_argument("--rule", help="only this rule's alerts")
    p.add_argument("--channel", help="only alerts to this channel")
    window = p.add_mutually_exclusive_group(required=True)
    window.add_argument("--for", dest="for_", metavar="DURATION", help="how long from now: 30m, 2h, 1d")
    window.add_argument("--until", metavar="TIME", help="when it ends, with a time zone: 2026-12-01T08:00:00+08:00")
    p.add_argument("--comment", required=True, help="why (a ticket, an incident)")
    p.add_argument("--author", required=True, help="who adds it")
    action("list", "show active and pending silences, and those expired in the last day")
    p = action("expire", "end a silence now")
    p.add_argument("id", metavar="ID", help="the silence's id (see `silence list`)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="imm-router", description="Route Alibaba Cloud IMM events to alerts.")
    top.add_argument("--version", action="version", version=f"imm-router {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=Path("router.yaml"), help="config file (router.yaml)")
        return p

    p = command("check", "load and validate config, rules and templates")
    p.add_argument("--live", action="store_true", help="also check that every channel is reachable")
    p.add_argument("--strict", action="store_true", help="warnings are errors too (exit 2), for CI")
    p.set_defaults(func=cmd_check)
    p = command("route", "dry run: print the notifications events would produce, one JSON line each")
    p.add_argument("inputs", nargs="*", metavar="PATH|-", help="JSON event, array or JSON lines; - is stdin")
    p.add_argument(
        "--explain",
        action="store_true",
        help="per event: the rules that matched and what alert management would do now, and why",
    )
    p.set_defaults(func=cmd_route)
    p = command("test", "run rule unit tests (YAML cases of events and expected notifications)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_test)
    p = command("render", "render one template against one event and show every part")
    p.add_argument("--template", required=True, help="path under templates_dir")
    p.add_argument("--rule", default="example-rule", help="rule name shown in the template")
    p.add_argument("--severity", default="warning", choices=["critical", "warning", "info"])
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--digest", action="store_true", help="a digest template: the file's events are its alerts")
    kind.add_argument("--group", action="store_true", help="a group template: the file's events are the group")
    p.add_argument("events", nargs="+", metavar="PATH|-", help="JSON event, array or JSON lines; - is stdin")
    p.set_defaults(func=cmd_render)
    p = command("run", "run the service: consume Kafka, route, deliver")
    p.set_defaults(func=cmd_run)
    p = command("replay", "re-route records from the dead-letter topic (or a JSON-lines file)")
    p.add_argument("--file", type=Path, help="read records from this file instead of the topic")
    p.add_argument("--match", help="only records whose dead-letter reason or value contains this text")
    p.add_argument("--limit", type=int, help="stop after this many records")
    p.add_argument("--dry-run", action="store_true", help="print what would be routed, deliver nothing")
    p.set_defaults(func=cmd_replay)
    p = sub.add_parser("demo", help="run everything locally: embedded broker, mail and DingTalk capture servers")
    p.add_argument("--outbox", type=Path, default=Path("outbox"), help="where received alerts are written")
    p.add_argument("--exit", action="store_true", help="exit once the example events are routed")
    p.set_defaults(func=cmd_demo)
    add_silence_commands(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.config_given = "--config" in (argv if argv is not None else sys.argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
