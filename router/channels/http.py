"""The HTTP client the DingTalk, webhook and Alertmanager channels share: one pooled aiohttp session per channel."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from router.channels.base import Scrubber
from router.errors import DeliveryError

# Enough of an answer to show in an error; a misbehaving server cannot make us buffer megabytes.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes

    def describe(self, limit: int = 200) -> str:
        """``HTTP 503: <the start of the body>``, for an error message."""
        snippet = " ".join(self.body[:limit].decode(errors="replace").split())
        return f"HTTP {self.status}: {snippet}" if snippet else f"HTTP {self.status}"


class HttpClient:
    def __init__(self, channel: str, timeout: float, scrub: Scrubber, *, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context for https URLs (default: the system's trusted CAs)."""
        self.channel = channel
        self.scrub = scrub
        self._tls = tls
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self, method: str, url: URL, *, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        """One request; transport failures (refused, reset, timeout) raise a retriable DeliveryError."""
        if self._session is None:
            # Created on first use: a session belongs to the running event loop.
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, allow_redirects=False, ssl=self._tls or True
            ) as response:
                return Answer(response.status, await response.content.read(MAX_ANSWER_BYTES))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # An untrusted certificate stays untrusted until someone fixes the config: no retry.
            retriable = not isinstance(exc, aiohttp.ClientConnectorCertificateError)
            raise DeliveryError(self._describe(exc), retriable=retriable, channel=self.channel) from None
        except (ValueError, TypeError) as exc:
            # aiohttp refuses the request before sending it (a header with a newline): it never can be sent,
            # so it is permanent, and does not count against the channel's circuit breaker.
            message = self.scrub(f"the request cannot be sent: {type(exc).__name__}: {exc}")
            raise DeliveryError(message, retriable=False, channel=self.channel) from None

    async def reachable(self, url: URL) -> str:
        """Open and close a connection (TLS for https, certificate checked); nothing is sent, so a health
        check neither counts against a rate limit nor shows up at the receiver as a request."""
        tls = (self._tls or ssl.create_default_context()) if url.scheme == "https" else None
        try:
            async with asyncio.timeout(self._timeout.total):
                _, writer = await asyncio.open_connection(url.host, url.port, ssl=tls)
        except (TimeoutError, OSError) as exc:
            retriable = not isinstance(exc, ssl.SSLCertVerificationError)
            raise DeliveryError(self._describe(exc), retriable=retriable, channel=self.channel) from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return f"{url.host}:{url.port} reachable{' (TLS, certificate verified)' if tls else ''}"

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout.total:g}s"
        # aiohttp's texts can hold the request URL, token included.
        return self.scrub(f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
