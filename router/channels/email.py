"""Email over SMTP (aiosmtplib): multipart text + html, STARTTLS or implicit TLS, AUTH."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, ClassVar, Literal

import aiosmtplib
from pydantic import Field, SecretStr, model_validator

from router.channels.base import (
    ChannelConfigBase,
    PayloadMeta,
    PemFile,
    Scrubber,
    header_value,
    one_line,
    tls_context,
)
from router.errors import DeliveryError
from router.notification import Notification

log = logging.getLogger(__name__)

# Servers drop idle sessions after a few minutes, and a NAT may drop them silently (the next send would
# then hang until its timeout): a connection idle longer than this is closed rather than reused.
MAX_IDLE_SECONDS = 60.0
# A health check logs in at most this often (a send that logs in counts too): a login every check would
# fill the server's auth log, and with a wrong password risk locking the account.
LOGIN_CHECK_SECONDS = 3_600.0
# After an authentication failure nothing logs in (no send, no check) for this long, doubling after each
# further failure up to AUTH_BACKOFF_MAX_SECONDS: the same wrong password again and again locks accounts.
AUTH_BACKOFF_SECONDS = 300.0
AUTH_BACKOFF_MAX_SECONDS = 3_600.0


class EmailConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("subject", "text")
    optional_blocks: ClassVar[tuple[str, ...]] = ("html",)

    type: Literal["email"]
    host: str
    port: int = Field(default=587, gt=0, lt=65536)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    ca_file: PemFile | None = None
    verify: bool = Field(default=True, description="verify the server certificate (keep it on)")
    username: str | None = None
    password: SecretStr | None = None
    from_: str = Field(alias="from")
    to: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _ca_loads(self) -> EmailConfig:
        if self.ca_file is not None:
            tls_context(self.ca_file)
        return self

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        return {
            "from": self.from_,
            "to": list(self.to),
            "subject": one_line(parts["subject"]),
            "text": parts["text"],
            "html": parts.get("html") or None,
            "headers": {"X-IMM-Event-Id": header_value(meta.event_id), "X-IMM-Rule": header_value(meta.rule)},
        }


class EmailChannel:
    """Sends over a small pool of SMTP connections, kept open between messages (TLS and AUTH once each).

    The pool grows to the number of concurrent sends the delivery stage allows."""

    health_verifies_credentials = True  # AUTH, at most once per LOGIN_CHECK_SECONDS

    def __init__(self, name: str, config: EmailConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._scrub = Scrubber(config.secret_values())
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # with the time each went idle
        self._tls_context: ssl.SSLContext | None = None
        self._logged_in_at: float | None = None
        self._auth_failure: str | None = None  # what the last login failure said, while backing off
        self._auth_retry_at = 0.0
        self._auth_backoff = AUTH_BACKOFF_SECONDS

    def _message(self, payload: Mapping[str, Any]) -> EmailMessage:
        message = EmailMessage()
        try:
            message["From"] = payload["from"]
            message["To"] = ", ".join(payload["to"])
            message["Subject"] = payload["subject"]
            message["Date"] = formatdate(localtime=False)
            # A domain of our own: make_msgid() would otherwise ask DNS for this host's name every time.
            message["Message-ID"] = make_msgid(domain=parseaddr(payload["from"])[1].rpartition("@")[2] or "imm-router")
            for key, value in payload["headers"].items():
                message[key] = value
            message.set_content(payload["text"])
            if payload.get("html"):
                message.add_alternative(payload["html"], subtype="html")
        except (ValueError, TypeError) as exc:
            raise DeliveryError(f"cannot build the message: {exc}", retriable=False, channel=self.name) from None
        return message

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            try:
                ctx = tls_context(self.config.ca_file)
            except ValueError as exc:  # the file changed since the config was loaded
                raise DeliveryError(str(exc), retriable=False, channel=self.name) from None
            if not self.config.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._tls_context = ctx
        return self._tls_context

    async def _connect(self, *, login: bool = True) -> aiosmtplib.SMTP:
        cfg = self.config
        login = login and cfg.username is not None
        if login and self._auth_failure is not None and self._clock() < self._auth_retry_at:
            wait = self._auth_retry_at - self._clock()
            raise self._error(f"{self._auth_failure}; no login is tried for another {wait:.0f}s", False)
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            use_tls=cfg.tls == "implicit",
            start_tls=cfg.tls == "starttls",
            tls_context=self._context() if cfg.tls != "none" else None,
            username=cfg.username if login else None,
            password=cfg.password.get_secret_value() if cfg.password and login else None,
            timeout=cfg.timeout_seconds,
        )
        try:
            await client.connect()  # EHLO, STARTTLS, EHLO again, AUTH
        except aiosmtplib.SMTPAuthenticationError as exc:
            self._auth_failure = self._auth_failed(exc)
            self._auth_retry_at = self._clock() + self._auth_backoff
            self._auth_backoff = min(self._auth_backoff * 2, AUTH_BACKOFF_MAX_SECONDS)
            raise
        if login:
            self._logged_in_at = self._clock()
            self._auth_failure, self._auth_backoff = None, AUTH_BACKOFF_SECONDS
        return client

    async def _transact(self, client: aiosmtplib.SMTP, message: EmailMessage) -> None:
        try:
            refused, _ = await client.send_message(message)
        except BaseException:
            client.close()  # the session state is unknown: never reuse it
            raise
        self._idle.append((client, time.monotonic()))
        if refused:
            # Delivered to the others: a retry would send them a second copy.
            log.warning("%s: recipients refused: %s", self.name, ", ".join(f"{r}: {v}" for r, v in refused.items()))

    async def send(self, notification: Notification) -> None:
        message = self._message(notification.payload)
        try:
            client = self._reusable()
            if client is not None:
                try:
                    await self._transact(client, message)
                    return
                except aiosmtplib.SMTPServerDisconnected:
                    pass  # the server dropped the idle connection at the wrong moment: one fresh try
            await self._transact(await self._connect(), message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._classify(exc) from None

    def _reusable(self) -> aiosmtplib.SMTP | None:
        """The most recently used idle connection that is still good; the stale ones are closed."""
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < MAX_IDLE_SECONDS:
                return client
            client.close()
        return None

    def _classify(self, exc: BaseException) -> DeliveryError:
        tls = _tls_error(exc)
        if isinstance(tls, ssl.SSLCertVerificationError):
            hint = "; set ca_file to the CA that signed it" if self.config.verify else ""
            return self._error(f"TLS certificate not trusted: {tls.verify_message}{hint}", False)
        if tls is not None:
            # Wrong port for the tls mode, no common protocol: the config has to change.
            return self._error(f"TLS handshake failed (is tls: {self.config.tls} right for this port?): {tls}", False)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            return self._error(self._auth_failed(exc), False)
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            return self._error(f"all recipients refused: {detail}", any(400 <= r.code < 500 for r in exc.recipients))
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._error(f"{exc.code} {exc.message}", 400 <= exc.code < 500)
        if isinstance(exc, OSError):
            # Refused, reset, dropped or timed out: the server may be back in a moment.
            return self._error(f"{type(exc).__name__}: {exc}", True)
        # Anything else is the server not supporting what the config asks for (STARTTLS, AUTH, SMTPUTF8).
        return self._error(f"{type(exc).__name__}: {exc}", False)

    def _auth_failed(self, exc: aiosmtplib.SMTPAuthenticationError) -> str:
        return f"authentication failed for {self.config.username}: {exc.code} {exc.message}"

    def _error(self, message: str, retriable: bool) -> DeliveryError:
        return DeliveryError(self._scrub(message), retriable=retriable, channel=self.name)

    async def health(self) -> str:
        # A connection of its own, from scratch: connecting and TLS are what can go wrong. AUTH too, but it
        # is checked only when no login succeeded for LOGIN_CHECK_SECONDS, and not while backing off.
        since = None if self._logged_in_at is None else self._clock() - self._logged_in_at
        login = since is None or since > LOGIN_CHECK_SECONDS or self._auth_failure is not None
        try:
            client = await self._connect(login=login)
            try:
                await client.noop()
                await client.quit()
            finally:
                client.close()
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise self._classify(exc) from None
        user = self.config.username
        auth = "" if user is None else f", AUTH as {user}" if login else f", AUTH as {user} {since:.0f}s ago"
        return f"SMTP {self.config.host}:{self.config.port} answered EHLO and NOOP (tls {self.config.tls}{auth})"

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if any: aiosmtplib raises some bare and wraps others."""
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded walk: exception chains can loop
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
