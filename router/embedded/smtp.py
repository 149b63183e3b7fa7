"""An SMTP server that captures what it receives (aiosmtpd), with optional STARTTLS/SMTPS and AUTH."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import ssl
import time
import warnings
import weakref
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from router.embedded import Recorder, Served, write_atomic

__all__ = ["ReceivedMessage", "SmtpCapture"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage
    response: str  # what the server answered to DATA, e.g. "250 OK" or "451 4.3.0 ..."
    tls: bool  # the session was encrypted (STARTTLS or implicit TLS)
    username: str | None  # who authenticated, if anyone
    received_at: float = field(default_factory=time.time)

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))


class SmtpCapture(Served):
    """Captures mail on ``host:port`` (port 0: a free one), in the event loop that calls :meth:`start`.

    - ``tls_context``: server context; STARTTLS is offered and required (or, with ``implicit_tls``,
      the whole connection is TLS: SMTPS).
    - ``auth=(username, password)``: AUTH PLAIN/LOGIN required, and only over TLS when TLS is on.
    - ``outbox``: directory receiving each accepted message as ``NNNNNN.eml``.
    - :meth:`fail_next`: answer the next N DATA commands with a given code (451 retriable, 550 permanent).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        outbox: str | Path | None = None,
        server_hostname: str = "smtp.embedded.test",
        data_size_limit: int = 10 * 1024 * 1024,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.outbox = Path(outbox) if outbox is not None else None
        self.server_hostname = server_hostname
        self.data_size_limit = data_size_limit
        self.received: Recorder[ReceivedMessage] = Recorder()  # accepted messages
        self.rejected: Recorder[ReceivedMessage] = Recorder()  # answered by fail_next()
        self.auth_failures = 0
        self.logins = 0  # successful AUTHs
        self._failures: list[tuple[int, str]] = []
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    @property
    def username(self) -> str | None:
        return self.auth[0] if self.auth else None

    @property
    def password(self) -> str | None:
        return self.auth[1] if self.auth else None

    @property
    def url(self) -> str:
        return f"{'smtps' if self.implicit_tls else 'smtp'}://{self.host}:{self.port}"

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages so far (a snapshot)."""
        return self.received.items

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until ``count`` messages were accepted; return all accepted so far."""
        return await self.received.wait_for(count, timeout)

    def fail_next(self, count: int = 1, code: int = 451, text: str | None = None) -> None:
        """Answer the next ``count`` DATA commands with ``code`` instead of 250."""
        default = "4.3.0 Try again later" if 400 <= code < 500 else "5.7.1 Message rejected"
        self._failures.extend([(code, text or default)] * count)

    # --- aiosmtpd handler hooks -------------------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if self._failures:
            code, text = self._failures.pop(0)
            response = f"{code} {text}"
        else:
            response = "250 OK"
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        user = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        msg = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            message=parsed,
            response=response,
            tls=self.implicit_tls or session.ssl is not None,
            username=user,
        )
        if not response.startswith("250"):
            self.rejected.add(msg)
            return response
        if self.outbox is not None:
            write_atomic(self.outbox / f"{len(self.received) + 1:06d}.eml", data)
        self.received.add(msg)
        return response

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            self.auth is not None
            and isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, self.auth[0].encode())
            and hmac.compare_digest(auth_data.password, self.auth[1].encode())
        )
        if ok:
            self.logins += 1
        else:
            self.auth_failures += 1
        # handled=False: let aiosmtpd answer "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # --- lifecycle ----------------------------------------------------------------------------

    def _factory(self) -> SMTP:
        with warnings.catch_warnings():
            # With implicit TLS the transport is already encrypted, but aiosmtpd only knows about
            # STARTTLS: auth_require_tls must be off, and it warns about that.
            warnings.simplefilter("ignore", UserWarning)
            smtp = SMTP(
                self,
                hostname=self.server_hostname,
                data_size_limit=self.data_size_limit,
                enable_SMTPUTF8=True,
                tls_context=None if self.implicit_tls else self.tls_context,
                require_starttls=self.tls_context is not None and not self.implicit_tls,
                authenticator=self._authenticate if self.auth else None,
                auth_required=self.auth is not None,
                auth_require_tls=self.tls_context is not None and not self.implicit_tls,
                loop=asyncio.get_running_loop(),
            )
        self._sessions.add(smtp)
        return smtp

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.get_running_loop().create_server(
            self._factory, self.host, self.port, ssl=self.tls_context if self.implicit_tls else None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Python 3.11's wait_closed() does not wait for (or close) open client connections.
        for smtp in list(self._sessions):
            if smtp.transport is not None:
                smtp.transport.close()
        await server.wait_closed()
