"""A fake DingTalk custom robot API (``POST /robot/send``) that checks what the real one checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from router.embedded import HttpServer, Recorder, write_atomic

__all__ = ["ERRMSG", "MSGTYPES", "DingTalkRequest", "FakeDingTalk", "dingtalk_sign", "dingtalk_signature"]

MSGTYPES = frozenset({"text", "markdown", "actionCard", "link", "feedCard"})

# errcode -> errmsg, as DingTalk words them.
ERRMSG = {
    0: "ok",
    -1: "系统繁忙",
    40035: "缺少参数 json",
    130101: "send too fast, exceed 20 times per minute",
    300001: "token is not exist",
    310000: "sign not match",
    400105: "Not supported msgtype",
    460101: "message too long, exceed 20000 bytes",
}


def dingtalk_signature(secret: str, timestamp_ms: int | str) -> str:
    """base64(HMAC-SHA256(key=secret, msg="<timestamp_ms>\\n<secret>")), not yet URL-encoded."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """The ``sign`` query value for ``timestamp_ms``, URL-encoded as a client must send it."""
    return urllib.parse.quote_plus(dingtalk_signature(secret, timestamp_ms))


@dataclass(frozen=True)
class DingTalkRequest:
    token: str | None
    query: dict[str, str]  # URL-decoded
    body: bytes
    payload: Any  # the parsed JSON body, None if it did not parse
    http_status: int
    errcode: int
    errmsg: str
    received_at: float = field(default_factory=time.time)

    @property
    def msgtype(self) -> str | None:
        return self.payload.get("msgtype") if isinstance(self.payload, dict) else None

    @property
    def accepted(self) -> bool:
        return self.http_status == 200 and self.errcode == 0


class FakeDingTalk(HttpServer):
    """DingTalk's robot API on loopback. ``robots`` maps access token -> signing secret (or None).

    Answers, in this order: forced failures (:meth:`fail_next`); unknown token 300001; for a robot
    with a secret, a missing/bad ``sign`` or a ``timestamp`` more than ``timestamp_tolerance``
    seconds off 310000; body over ``max_body`` bytes 460101; body not a JSON object 40035; unknown
    msgtype 400105; more than ``rate_limit`` messages in ``rate_window`` seconds 130101, after which
    the robot answers 130101 for ``throttle_for`` seconds. ``clock`` (monotonic, for rate limits)
    and ``wall_clock`` (epoch seconds, for timestamps) can be replaced to test time without sleeping.
    """

    def __init__(
        self,
        robots: Mapping[str, str | None] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: int = 20,
        rate_window: float = 60.0,
        throttle_for: float = 600.0,
        timestamp_tolerance: float = 3600.0,
        max_body: int = 20_000,
        outbox: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(host=host, port=port)
        self.robots: dict[str, str | None] = dict(robots or {})
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.throttle_for = throttle_for
        self.timestamp_tolerance = timestamp_tolerance
        self.max_body = max_body
        self.outbox = Path(outbox) if outbox is not None else None
        self.clock = clock
        self.wall_clock = wall_clock
        self.requests: Recorder[DingTalkRequest] = Recorder()  # every request, with its answer
        self.accepted: Recorder[DingTalkRequest] = Recorder()  # errcode 0 only
        self.errcodes: Counter[int] = Counter()
        self._sent: dict[str, deque[float]] = {}
        self._throttled_until: dict[str, float] = {}
        self._forced: list[tuple[int, str, int]] = []

    def add_robot(self, token: str, secret: str | None = None) -> None:
        self.robots[token] = secret

    def webhook_url(self, token: str) -> str:
        return f"{self.url}/robot/send?access_token={urllib.parse.quote(token)}"

    def fail_next(self, count: int = 1, errcode: int = -1, errmsg: str | None = None, http_status: int = 200) -> None:
        """Answer the next ``count`` requests with ``errcode`` (HTTP 200), or with ``http_status``
        and a plain-text body if that is not 200 (the errcode is then only recorded)."""
        self._forced.extend([(errcode, errmsg or ERRMSG.get(errcode, "error"), http_status)] * count)

    def throttled(self, token: str) -> bool:
        return self.clock() < self._throttled_until.get(token, float("-inf"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The accepted message bodies."""
        return [r.payload for r in self.accepted.items]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[DingTalkRequest]:
        """Wait until ``count`` messages were accepted; return all accepted so far."""
        return await self.accepted.wait_for(count, timeout)

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[DingTalkRequest]:
        """Wait until ``count`` requests arrived, whatever the answer."""
        return await self.requests.wait_for(count, timeout)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/robot/send", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        query = dict(request.query)
        token = query.get("access_token")
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = None
        http_status = 200
        if self._forced:
            errcode, errmsg, http_status = self._forced.pop(0)
        else:
            errcode, errmsg = self._check(token, query, body, payload)
        record = DingTalkRequest(token, query, body, payload, http_status, errcode, errmsg)
        self.errcodes[errcode] += 1
        if record.accepted:
            if self.outbox is not None:
                doc = {"token": token, "received_at": record.received_at, "message": payload}
                name = f"{len(self.accepted) + 1:06d}-{record.msgtype}.json"
                write_atomic(self.outbox / name, json.dumps(doc, ensure_ascii=False, indent=2).encode())
            self.accepted.add(record)
        self.requests.add(record)
        if http_status != 200:
            return web.Response(status=http_status, text=errmsg)
        return web.json_response({"errcode": errcode, "errmsg": errmsg})

    def _check(self, token: str | None, query: dict[str, str], body: bytes, payload: Any) -> tuple[int, str]:
        if token is None or token not in self.robots:
            return 300001, ERRMSG[300001]
        secret = self.robots[token]
        if secret is not None:
            timestamp, sign = query.get("timestamp", ""), query.get("sign", "")
            if not timestamp.isdigit() or abs(self.wall_clock() * 1000 - int(timestamp)) > (
                self.timestamp_tolerance * 1000
            ):
                return 310000, "invalid timestamp"
            # The query is already URL-decoded: a client that forgot to encode "+" sent a space.
            if not hmac.compare_digest(sign.encode(), dingtalk_signature(secret, timestamp).encode()):
                return 310000, ERRMSG[310000]
        if len(body) > self.max_body:
            return 460101, ERRMSG[460101]
        if not isinstance(payload, dict):
            return 40035, ERRMSG[40035]
        msgtype = payload.get("msgtype")
        if not isinstance(msgtype, str) or msgtype not in MSGTYPES:
            return 400105, ERRMSG[400105]
        now = self.clock()
        if self.throttled(token):
            return 130101, ERRMSG[130101]
        sent = self._sent.setdefault(token, deque())
        while sent and sent[0] <= now - self.rate_window:
            sent.popleft()
        if len(sent) >= self.rate_limit:
            self._throttled_until[token] = now + self.throttle_for
            return 130101, ERRMSG[130101]
        sent.append(now)
        return 0, ERRMSG[0]
