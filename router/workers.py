"""``service.workers: N``: one pod using N cores. Each worker is a whole router in its own process (a member
of both consumer groups, so Kafka spreads the partitions over the workers as over replicas). The supervisor
owns the pod's port: ``/healthz`` and ``/readyz`` answer for every worker, ``/metrics`` merges theirs under
a ``worker`` label, and every other path (the silences API, HTTP ingest) goes to a live worker. It passes
SIGHUP on, stops the workers on SIGTERM (each drains as a single router does) and restarts one that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.engine import Engine

log = logging.getLogger(__name__)

RESTART_BACKOFF_FIRST = 1.0
RESTART_BACKOFF_MAX = 30.0
# A worker that ran this long before it died is restarted after the first delay again, not the last one.
STABLE_SECONDS = 60.0
# Not forwarded by the proxy: they describe one hop, not the message.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


@dataclass(eq=False)
class Worker:
    index: int
    process: BaseProcess
    port_report: Connection
    started: float  # monotonic seconds
    port: int | None = None


def restart_delay(last: float | None, ran_for: float) -> float:
    """The wait before restarting a worker that died after running ``ran_for`` seconds; ``last``: the wait
    before it started (None: never restarted). It doubles while the worker keeps dying young."""
    if last is None or ran_for >= STABLE_SECONDS:
        return RESTART_BACKOFF_FIRST
    return min(last * 2, RESTART_BACKOFF_MAX)


def worker_main(config_path: Path, index: int, port_report: Connection) -> None:
    """A worker process: the router, with its ops server on a local port it reports to the supervisor."""
    from router.service import run_service

    raise SystemExit(asyncio.run(run_service(config_path, worker=(index, port_report.send))))


class Supervisor:
    def __init__(self, engine: Engine, config_path: Path) -> None:
        self.engine = engine
        self.config_path = config_path
        self.count = engine.settings.service.workers
        self.workers: list[Worker] = []
        self.stopping = asyncio.Event()
        self._spawn = multiprocessing.get_context("spawn")  # no forked copies of a running event loop
        self._next = itertools.count()
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        self.workers = [self._start(i) for i in range(self.count)]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        http = self.engine.settings.http
        runner = None
        if http.enabled:
            runner = web.AppRunner(self._app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, http.host, http.port).start()
        log.info("supervising %d workers (pids %s)", self.count, [w.process.pid for w in self.workers])
        try:
            await self._watch()
        finally:
            await self._stop_workers()
            if runner is not None:
                await runner.cleanup()
            await self._session.close()
        return 0

    def _start(self, index: int) -> Worker:
        receive, send = self._spawn.Pipe(duplex=False)
        process = self._spawn.Process(
            target=worker_main, args=(self.config_path, index, send), name=f"imm-router-worker-{index}"
        )
        process.start()
        send.close()  # the child holds its end
        return Worker(index, process, receive, started=time.monotonic())

    async def _watch(self) -> None:
        """Learn the workers' ports; restart a worker that died (with backoff) until told to stop."""
        delays: list[float | None] = [None] * self.count
        while not self.stopping.is_set():
            for i, worker in enumerate(self.workers):
                with contextlib.suppress(EOFError, OSError):
                    while worker.port_report.poll():
                        worker.port = int(worker.port_report.recv())
                if not worker.process.is_alive() and not self.stopping.is_set():
                    ran_for = time.monotonic() - worker.started
                    delay = delays[i] = restart_delay(delays[i], ran_for)
                    log.error(
                        "worker %d (pid %s) exited with %s after %.0fs; restarting in %.0fs",
                        i,
                        worker.process.pid,
                        worker.process.exitcode,
                        ran_for,
                        delay,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
                    if not self.stopping.is_set():
                        self.workers[i] = self._start(i)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.2)

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    async def _stop_workers(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self.engine.settings.service.drain_timeout_seconds + 10
        while any(w.process.is_alive() for w in self.workers) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)  # polling a child's exit: multiprocessing offers no awaitable
        for worker in self.workers:
            if worker.process.is_alive():
                log.error("worker %d did not stop within the drain deadline; killing it", worker.index)
                worker.process.kill()
            worker.process.join(1)

    # --- the pod's port ------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        return app

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.port is not None and w.process.is_alive()]

    async def _get(self, worker: Worker, path: str) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{worker.port}{path}") as response:
            return response.status, await response.read()

    async def healthz(self, _: web.Request) -> web.Response:
        alive = sum(1 for w in self.workers if w.process.is_alive())
        return web.json_response(
            {"status": "ok" if alive == self.count else "degraded", "workers_alive": alive},
            status=200 if alive == self.count else 503,
        )

    async def readyz(self, _: web.Request) -> web.Response:
        """Ready when every worker is; each worker's own report is listed."""
        reports: list[dict[str, Any]] = []
        live = self._live()
        for worker in self.workers:
            report: dict[str, Any] = {"worker": worker.index, "pid": worker.process.pid, "ready": False}
            if worker in live:
                try:
                    report |= json.loads((await self._get(worker, "/readyz"))[1])
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    report["error"] = f"{type(exc).__name__}: {exc}"
            else:
                report["error"] = "starting" if worker.process.is_alive() else "not running"
            reports.append(report)
        ready = all(r["ready"] for r in reports) and not self.stopping.is_set()
        return web.json_response({"ready": ready, "workers": reports}, status=200 if ready else 503)

    async def metrics(self, _: web.Request) -> web.Response:
        texts = []
        for worker in self._live():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                status, body = await self._get(worker, "/metrics")
                if status == 200:
                    texts.append((worker.index, body.decode()))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(texts))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """The silences API and HTTP ingest: any worker serves them (they share the broker, not memory)."""
        live = self._live()
        if not live:
            return web.json_response(
                {"error": "no worker is running yet; retry"}, status=503, headers={"Retry-After": "1"}
            )
        assert self._session is not None
        worker = live[next(self._next) % len(live)]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method,
            f"http://127.0.0.1:{worker.port}{request.rel_url}",
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            out = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=response.status, body=body, headers=out)


class _Merged:
    """The workers' metrics as one exposition: each sample labelled with its worker."""

    def __init__(self, texts: list[tuple[int, str]]) -> None:
        self.texts = texts

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for index, text in self.texts:
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": str(index)}, sample.value, sample.timestamp
                    )
        return list(families.values())
