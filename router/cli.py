"""``imm-router`` commands. Each exits non-zero on failure with a message a person can act on."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from router import __version__
from router.config import Settings, load_settings
from router.decode import Limits, iter_events
from router.engine import load
from router.errors import ConfigError, DecodeError, RouterError
from router.render import TemplateSet

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
    kinds = ", ".join(f"{name} ({ch.type})" for name, ch in sorted(settings.channels.items()))
    files = sorted({str(r.path) for r in engine.rules.rules})
    print(f"config OK: {args.config}")
    print(f"  channels:  {len(settings.channels)}: {kinds or 'none'}")
    print(f"  rules:     {len(engine.rules.rules)} in {len(files)} file(s) under {settings.rules_dir}")
    print(f"  templates: {len(engine.templates.text)} under {settings.templates_dir}")
    if args.live:
        from router.delivery.health import check_live

        return int(asyncio.run(check_live(engine)))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    engine = load(args.config)
    failed = False
    out = sys.stdout
    for name, raw in read_inputs(args.inputs, sys.stdin):
        for item in iter_events(name, raw, engine.limits):
            if isinstance(item, DecodeError):
                failed = True
                print(f"error: {item}", file=sys.stderr)
                continue
            result = engine.route(item)
            for notification in result.notifications:
                out.write(orjson.dumps(notification.route_line()).decode() + "\n")
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
    templates = TemplateSet(settings.templates_dir, settings.timezone)
    if args.template not in templates.text:
        raise ConfigError(f"template {args.template!r} not found under {settings.templates_dir}")
    raw = Path(args.event).read_bytes()
    limits = Limits(settings.max_event_bytes, settings.max_event_depth)
    events = list(iter_events(args.event, raw, limits))
    status = 0
    for event in events:
        if isinstance(event, DecodeError):
            print(f"error: {event}", file=sys.stderr)
            status = 1
            continue
        context: dict[str, Any] = {
            "event": event.event_doc(),
            "data": event.data,
            "imm": event.view,
            "channel": "render",
            "rule": {"name": args.rule, "description": args.rule, "severity": args.severity, "labels": {}},
        }
        blocks = tuple(sorted(templates.blocks(args.template)))
        for block, text in templates.render_parts(args.template, blocks, context).items():
            print(f"--- {block} ---\n{text}\n")
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from router.service import run_service

    return asyncio.run(run_service(args.config))


def cmd_replay(args: argparse.Namespace) -> int:
    from router.service import replay

    return asyncio.run(replay(args.config, source=args.file, match=args.match, dry_run=args.dry_run, limit=args.limit))


def cmd_demo(args: argparse.Namespace) -> int:
    from router.embedded.demo import run_demo

    return asyncio.run(run_demo(args.outbox, exit_after=args.exit))


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
    p.set_defaults(func=cmd_check)
    p = command("route", "dry run: print the notifications events would produce, one JSON line each")
    p.add_argument("inputs", nargs="*", metavar="PATH|-", help="JSON event, array or JSON lines; - is stdin")
    p.set_defaults(func=cmd_route)
    p = command("test", "run rule unit tests (YAML cases of events and expected notifications)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_test)
    p = command("render", "render one template against one event and show every part")
    p.add_argument("--template", required=True, help="path under templates_dir")
    p.add_argument("--rule", default="example-rule", help="rule name shown in the template")
    p.add_argument("--severity", default="warning", choices=["critical", "warning", "info"])
    p.add_argument("event", metavar="EVENTFILE")
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
