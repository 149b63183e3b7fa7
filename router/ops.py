"""What operators and Kubernetes see of a running router: JSON logs with secrets redacted, the HTTP
endpoints (/metrics, /healthz, /readyz), and hot reload of config, rules and templates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, SecretStr

from router.alerting.silence_api import SilenceAPI
from router.channels.base import Scrubber
from router.config import Settings
from router.sources.http import HttpIngest

if TYPE_CHECKING:
    from router.service import Service

log = logging.getLogger(__name__)


# --- logs -----------------------------------------------------------------------------------------


def secret_values(settings: Settings) -> set[str]:
    """Every secret the config holds: SecretStr fields, at any depth."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            found.add(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(settings)
    return {s for s in found if len(s) >= 4}


class Redactor(logging.Filter):
    """Masks secrets in every log record with the channels' Scrubber (a URL's token is masked on its own
    too); ``use`` swaps the secrets on reload."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.use(secrets)

    def use(self, secrets: Iterable[str]) -> None:
        self.scrub = Scrubber(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings, stream: Any = None) -> Redactor:
    """JSON lines on stderr at the configured level, secrets redacted."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    redactor = Redactor(secret_values(settings))
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    return redactor


# --- HTTP endpoints -------------------------------------------------------------------------------


class OpsServer:
    """/metrics (Prometheus), /healthz (the event loop answers), /readyz (config, broker, channels), the
    silences API and, when enabled, HTTP ingest (router.sources.http)."""

    def __init__(self, service: Service, host: str, port: int) -> None:
        self.service = service
        self.host, self.port = host, port
        self.runner: web.AppRunner | None = None
        self.ingest: HttpIngest | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        paths = "/metrics /healthz /readyz"
        if hasattr(self.service, "silences"):
            self._silence_api().add_routes(app)
            paths += " /api/v1/silences"
        if self.service.engine.settings.ingest.enabled:
            service = self.service
            self.ingest = HttpIngest(lambda: service.engine, lambda: service.producer, service.metrics)
            paths += " " + " ".join(self.ingest.add_routes(app))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("serving %s on %s:%d", paths, self.host, self.port)

    def _silence_api(self) -> SilenceAPI:
        # Looked up per request: the service creates its store once Kafka answers (after this server
        # starts), and a reload may change the token or the rule and channel names.
        service = self.service
        return SilenceAPI(
            lambda: getattr(service, "silences", None),
            lambda: service.engine.settings.http.api_token,
            names=lambda: ({r.name for r in service.engine.rules.rules}, set(service.engine.settings.channels)),
        )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.ingest is not None:
            await self.ingest.close()

    async def metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        report = await self.service.readiness()
        return web.json_response(report, status=200 if report["ready"] else 503)


# --- hot reload -----------------------------------------------------------------------------------


def fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of every file under ``paths``, symlinks followed: a Kubernetes ConfigMap
    update swaps the ``..data`` symlink, which changes what the visible names resolve to."""
    seen: list[tuple[str, int, int]] = []
    for root in paths:
        candidates = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for path in candidates:
            if any(part.startswith("..") for part in path.parts):
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                if not os.path.isdir(path):
                    seen.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(seen)


class Watcher:
    """Polls the config file, rules and templates; a change reloads (which validates before swapping)."""

    def __init__(self, service: Service, interval: float) -> None:
        self.service = service
        self.interval = interval
        self.last = self._current()

    def _current(self) -> tuple[tuple[str, int, int], ...]:
        settings = self.service.engine.settings
        watched = [settings.rules_dir, settings.templates_dir]
        if self.service.config_path is not None:
            watched.append(self.service.config_path)
        return fingerprint(watched)

    async def run(self) -> None:
        while not self.service.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.service.stopping.wait(), self.interval)
            current = await asyncio.to_thread(self._current)
            if current != self.last:
                self.last = current
                log.info("config, rules or templates changed on disk: reloading")
                self.service.reload()
