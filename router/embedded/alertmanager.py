"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) as a child process on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from router.embedded import free_port
from router.embedded.broker import _Child

__all__ = ["Alertmanager"]

BINARY = "/usr/bin/prometheus-alertmanager"
# Routes everything to a receiver that does nothing: the tests read alerts back through the API.
NULL_CONFIG = {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}


class Alertmanager(_Child):
    """Alertmanager on ``127.0.0.1:<free port>``, clustering off, its state in a temporary directory.

    ``config``: alertmanager.yml as a mapping (default: one receiver that does nothing). ``web_config``:
    the ``--web.config.file`` mapping (``tls_server_config``, ``basic_auth_users``); ``client_tls`` and
    ``client_headers`` (Authorization) are what this class's own requests (readiness, :meth:`alerts`) then need."""

    def __init__(
        self,
        *,
        config: dict[str, Any] | None = None,
        web_config: dict[str, Any] | None = None,
        client_tls: ssl.SSLContext | None = None,
        client_headers: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__("alertmanager", log_path)
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.config = config or NULL_CONFIG
        self.web_config = web_config
        self._tls = client_tls
        self._headers = client_headers or {}
        self.startup_timeout = startup_timeout
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.web_config and "tls_server_config" in self.web_config else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _argv(self, state: Path) -> list[str]:
        binary = shutil.which("prometheus-alertmanager") or BINARY
        if not Path(binary).exists():
            raise FileNotFoundError(f"{BINARY} not found: apt-get install -y prometheus-alertmanager (.ci/run does)")
        # JSON is YAML: no YAML writer needed.
        (state / "alertmanager.yml").write_text(json.dumps(self.config))
        argv = [
            binary,
            f"--config.file={state / 'alertmanager.yml'}",
            f"--storage.path={state / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--cluster.listen-address=",
        ]
        if self.web_config is not None:
            (state / "web.yml").write_text(json.dumps(self.web_config))
            argv.append(f"--web.config.file={state / 'web.yml'}")
        return argv

    async def start(self) -> None:
        if self.running:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="alertmanager-"))
        # A port picked by free_port() may be taken by the time Alertmanager binds it: retry on a new one.
        for attempt in range(3):
            self._spawn(self._argv(self._dir), None)
            try:
                await self._wait_ready(time.monotonic() + self.startup_timeout)
                return
            except RuntimeError:
                await self._reap(0)
                if attempt == 2:
                    raise
                self.port = free_port(self.host)

    async def _wait_ready(self, deadline: float) -> None:
        async with aiohttp.ClientSession(headers=self._headers) as session:
            while True:
                self._check_alive("alertmanager")
                try:
                    async with session.get(f"{self.url}/-/ready", ssl=self._tls or True) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"alertmanager not ready on {self.url}:\n{self.log_tail()}")
                await asyncio.sleep(0.02)

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        """A request to the API (``/api/v2/...``); the decoded JSON answer. Raises on a non-2xx answer."""
        async with (
            aiohttp.ClientSession(headers=self._headers) as session,
            session.request(method, f"{self.url}{path}", json=body, ssl=self._tls or True) as response,
        ):
            text = await response.text()
            if not 200 <= response.status < 300:
                raise RuntimeError(f"alertmanager {method} {path}: HTTP {response.status} {text}")
            return json.loads(text) if text else None

    async def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts (active, silenced and inhibited too); ``filters``: label = value matchers."""
        query = "&".join(f'filter={name}="{value}"' for name, value in filters.items())
        found: list[dict[str, Any]] = await self.api("GET", f"/api/v2/alerts?{query}")
        return found

    async def wait_for_alerts(self, count: int, timeout: float = 5.0, **filters: str) -> list[dict[str, Any]]:
        """Until at least ``count`` alerts (matching ``filters``) are there."""
        deadline = time.monotonic() + timeout
        while len(found := await self.alerts(**filters)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {count} alert(s) within {timeout}s, got {found!r:.2000}")
            await asyncio.sleep(0.02)
        return found

    async def stop(self, grace: float = 5.0) -> None:
        await super().stop(grace)
        state, self._dir = self._dir, None
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
