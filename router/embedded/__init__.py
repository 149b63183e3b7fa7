"""Small real servers on loopback for tests and the one-command local demo.

- :mod:`router.embedded.broker`: ``TansuBroker`` (Kafka-compatible broker) and ``MotoS3`` (S3 for Tansu).
- :mod:`router.embedded.smtp`: ``SmtpCapture`` (aiosmtpd capture server, STARTTLS/SMTPS, AUTH).
- :mod:`router.embedded.dingtalk`: ``FakeDingTalk`` (DingTalk custom robot API).
- :mod:`router.embedded.webhook`: ``WebhookCapture`` (generic HTTP capture).

This module holds the helpers they share; import the servers from their own modules.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Generic, Self, TypeVar

from aiohttp import web

T = TypeVar("T")

__all__ = ["HttpServer", "Recorder", "free_port", "write_atomic"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (only for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a watcher never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Recorder(Generic[T]):
    """An append-only list whose length can be awaited.

    ``add`` may be called from any thread (aiosmtpd's threaded controller, for instance); waiters
    are woken in their own event loop, so ``wait_for`` never polls.
    """

    def __init__(self) -> None:
        self._items: list[T] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, item: T) -> None:
        with self._lock:
            self._items.append(item)
            n = len(self._items)
            ready = [fut for count, fut in self._waiters if count <= n]
            self._waiters = [(c, f) for c, f in self._waiters if c > n]
        for fut in ready:
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    @property
    def items(self) -> list[T]:
        """A snapshot copy."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __getitem__(self, index: int) -> T:
        return self._items[index]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[T]:
        """Wait until at least ``count`` items arrived; return a snapshot of all items.

        Raises ``TimeoutError`` (with what did arrive) after ``timeout`` seconds.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if len(self._items) >= count:
                return list(self._items)
            self._waiters.append((count, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"expected {count} item(s) within {timeout}s, got {len(self._items)}: {self.items!r:.2000}"
            ) from None
        finally:
            with self._lock:
                self._waiters = [(c, f) for c, f in self._waiters if f is not fut]
        return self.items


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Served:
    """``async with`` for a test server: ``start()`` on entry, ``stop()`` on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class HttpServer(Served):
    """Base for the aiohttp capture servers: binds ``host:port`` (port 0: a free one) in the running loop."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        # A short shutdown_timeout: stop() should not wait a minute for a client's in-flight request.
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_router(config: Path, log: Path) -> asyncio.subprocess.Process:
    """``imm-router run --config`` as a child process of this interpreter, its output appended to ``log``."""
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "run",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
