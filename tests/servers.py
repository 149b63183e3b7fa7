"""Pytest fixtures running the embedded servers (router.embedded) on loopback.

Registered from tests/conftest.py with ``pytest_plugins = ["tests.servers"]``. Every fixture starts
its server itself: nothing is skipped for lack of an external service.

PYTEST_DONT_REWRITE: no asserts here, and test modules may import it before it is registered.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import trustme

from router.embedded.alertmanager import Alertmanager
from router.embedded.broker import MotoS3, TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.smtp import SmtpCapture
from router.embedded.webhook import WebhookCapture

SMTP_USERNAME = "router@example.test"
SMTP_PASSWORD = "s3cret-Pa55"
DINGTALK_SIGNED_TOKEN = "tok-signed"
DINGTALK_SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
DINGTALK_PLAIN_TOKEN = "tok-plain"


class TlsSmtpCapture(SmtpCapture):
    """An :class:`SmtpCapture` with TLS plus what a client needs to trust it."""

    def __init__(self, ca: trustme.CA, ca_pem_path: Path, **kwargs: Any) -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
        super().__init__(tls_context=server_ctx, **kwargs)
        self.ca = ca
        self.ca_pem_path = ca_pem_path

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority (trustme)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem_path(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate as a PEM file, for clients configured by path."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest_asyncio.fixture
async def smtp_plain() -> AsyncIterator[SmtpCapture]:
    """SMTP without TLS or AUTH."""
    async with SmtpCapture() as server:
        yield server


@pytest_asyncio.fixture
async def smtp_tls(ca: trustme.CA, ca_pem_path: Path) -> AsyncIterator[TlsSmtpCapture]:
    """SMTP requiring STARTTLS, then AUTH as SMTP_USERNAME / SMTP_PASSWORD."""
    async with TlsSmtpCapture(ca, ca_pem_path, auth=(SMTP_USERNAME, SMTP_PASSWORD)) as server:
        yield server


@pytest_asyncio.fixture
async def smtps(ca: trustme.CA, ca_pem_path: Path) -> AsyncIterator[TlsSmtpCapture]:
    """SMTPS (implicit TLS from the first byte), AUTH as SMTP_USERNAME / SMTP_PASSWORD."""
    server = TlsSmtpCapture(ca, ca_pem_path, implicit_tls=True, auth=(SMTP_USERNAME, SMTP_PASSWORD))
    async with server:
        yield server


@pytest_asyncio.fixture
async def dingtalk() -> AsyncIterator[FakeDingTalk]:
    """Fake DingTalk with two robots: DINGTALK_SIGNED_TOKEN (secret DINGTALK_SECRET) and
    DINGTALK_PLAIN_TOKEN (no secret)."""
    robots = {DINGTALK_SIGNED_TOKEN: DINGTALK_SECRET, DINGTALK_PLAIN_TOKEN: None}
    async with FakeDingTalk(robots) as server:
        yield server


@pytest_asyncio.fixture
async def webhook() -> AsyncIterator[WebhookCapture]:
    """Generic webhook receiver answering 200 (set ``webhook.statuses`` to script failures)."""
    async with WebhookCapture() as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tansu(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TansuBroker]:
    """One in-memory Tansu broker for the session: use ``unique_topic`` to keep tests apart.
    Do not kill or restart it; use ``tansu_factory`` for that."""
    async with TansuBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as broker:
        yield broker


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_topic("alerts")`` -> a topic name no other test uses."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name)[:60]

    def make(prefix: str = "t") -> str:
        return f"{prefix}.{test}.{uuid.uuid4().hex[:8]}"

    return make


Child = TypeVar("Child", TansuBroker, Alertmanager)


@contextlib.asynccontextmanager
async def started(kind: type[Child], log_dir: Path) -> AsyncIterator[Callable[..., Awaitable[Child]]]:
    """``await make(**kwargs)`` -> a started ``kind(**kwargs)`` logging to ``log_dir``; all stopped at the end."""
    children: list[Child] = []

    async def make(**kwargs: Any) -> Child:
        kwargs.setdefault("log_path", log_dir / f"{kind.__name__.lower()}-{len(children)}.log")
        child = kind(**kwargs)
        children.append(child)
        await child.start()
        return child

    try:
        yield make
    finally:
        for child in children:
            await child.stop()


@pytest_asyncio.fixture
async def tansu_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[TansuBroker]]]:
    """``await tansu_factory(**TansuBroker kwargs)`` -> a started broker of this test's own
    (free to kill/restart); all are stopped at teardown."""
    async with started(TansuBroker, tmp_path) as make:
        yield make


@pytest_asyncio.fixture
async def moto_s3(tmp_path: Path) -> AsyncIterator[MotoS3]:
    """moto_server with bucket ``tansu``, for
    ``TansuBroker(storage_engine="s3://tansu/", env=moto_s3.broker_env())``."""
    async with MotoS3(log_path=tmp_path / "moto.log") as server:
        yield server


@pytest_asyncio.fixture
async def alertmanager_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Alertmanager]]]:
    """``await alertmanager_factory(**Alertmanager kwargs)`` -> a started Prometheus Alertmanager of this
    test's own on a free loopback port; all are stopped at teardown."""
    async with started(Alertmanager, tmp_path) as make:
        yield make


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for a server's ``outbox``."""
    path = tmp_path / "outbox"
    path.mkdir()
    yield path
