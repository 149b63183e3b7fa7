"""A generic HTTP webhook receiver that records every request and answers scripted statuses."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from router.embedded import HttpServer, Recorder, write_atomic

__all__ = ["WebhookCapture", "WebhookRequest"]


@dataclass(frozen=True)
class WebhookRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the server answered
    received_at: float = field(default_factory=time.time)

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookCapture(HttpServer):
    """Accepts any method on any path. Answers ``statuses`` in order (e.g. ``[503, 503, 200]``),
    then ``default_status``; every request is recorded in :attr:`requests` whatever the answer.
    ``outbox``: directory receiving each request as ``NNNNNN.json``.
    """

    def __init__(
        self,
        statuses: Iterable[int] = (),
        *,
        default_status: int = 200,
        response_body: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        outbox: str | Path | None = None,
    ) -> None:
        super().__init__(host=host, port=port)
        self.statuses = list(statuses)
        self.default_status = default_status
        self.response_body = response_body
        self.outbox = Path(outbox) if outbox is not None else None
        self.requests: Recorder[WebhookRequest] = Recorder()
        # Cleared by hold(): requests are recorded but their answers wait, like a stalled endpoint.
        self.open = asyncio.Event()
        self.open.set()

    def hold(self) -> None:
        """Stall: answer nothing until release()."""
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def set_statuses(self, statuses: Iterable[int]) -> None:
        """Replace the statuses still to be answered."""
        self.statuses = list(statuses)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[WebhookRequest]:
        """Wait until ``count`` requests arrived (whatever the answer); return all so far."""
        return await self.requests.wait_for(count, timeout)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else self.default_status
        record = WebhookRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            status=status,
        )
        if self.outbox is not None:
            write_atomic(self.outbox / f"{len(self.requests) + 1:06d}.json", _dump(record))
        self.requests.add(record)
        await self.open.wait()
        return web.Response(status=status, text=self.response_body)


def _dump(record: WebhookRequest) -> bytes:
    body: Any
    try:
        body = record.json()
    except ValueError:
        try:
            body = record.body.decode()
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(record.body).decode()}
    doc = {
        "method": record.method,
        "path": record.path,
        "query": record.query,
        "headers": record.headers,
        "status": record.status,
        "received_at": record.received_at,
        "body": body,
    }
    return json.dumps(doc, ensure_ascii=False, indent=2).encode()
