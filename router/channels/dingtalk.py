"""DingTalk custom group robot: signed requests, markdown / text / actionCard, @mentions; a pool of
robots of one group behind one channel, each with its own 20-a-minute window."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

import orjson
from pydantic import Field, SecretStr, field_validator, model_validator
from yarl import URL

from router.channels.base import (
    ChannelConfigBase,
    Frozen,
    PayloadMeta,
    RateLimit,
    Scrubber,
    check_http_url,
    one_line,
)
from router.channels.http import Answer, HttpClient
from router.errors import DeliveryError
from router.notification import Notification

# DingTalk refuses bodies over 20,000 bytes (errcode 460101); stay clear of it.
MAX_BODY_BYTES = 19_000
TRUNCATION_MARKER = "\n\n…(truncated)"

# errcodes that say "later": sending too fast (130101, 410100) and "system busy" (-1). Every other
# non-zero code (bad token or signature, robot stopped, bad msgtype, body too long, …) stays wrong.
RETRIABLE_ERRCODES = frozenset({130101, 410100, -1})


def _has_token(url: SecretStr | None) -> SecretStr | None:
    if url is None:
        return url
    check_http_url(url)
    if not dict(parse_qsl(urlsplit(url.get_secret_value()).query)).get("access_token"):
        raise ValueError("url must carry ?access_token=… (the robot's webhook address)")
    return url


class Robot(Frozen):
    url: SecretStr = Field(description="robot webhook URL with access_token: a secret")
    secret: SecretStr | None = Field(default=None, description="signing secret (加签)")

    _has_token = field_validator("url")(_has_token)


class DingTalkConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("title", "text")
    optional_blocks: ClassVar[tuple[str, ...]] = ("button_title", "button_url")

    type: Literal["dingtalk"]
    url: SecretStr | None = Field(default=None, description="robot webhook URL with access_token: a secret")
    secret: SecretStr | None = Field(default=None, description="signing secret (加签)")
    robots: tuple[Robot, ...] = Field(
        default=(), description="instead of url/secret: several robots of one group, each with its own limit"
    )
    msgtype: Literal["markdown", "text", "actionCard"] = "markdown"
    at_mobiles: tuple[str, ...] = ()
    at_user_ids: tuple[str, ...] = ()
    at_all: bool = False

    _has_token = field_validator("url")(_has_token)

    @model_validator(mode="after")
    def _url_or_robots(self) -> DingTalkConfig:
        if (self.url is None) == (not self.robots):
            raise ValueError("give url (and secret) for one robot, or robots: [{url, secret}, …] for a pool")
        if self.robots and self.secret is not None:
            raise ValueError("with robots, give each robot its own secret")
        return self

    @property
    def pool(self) -> tuple[Robot, ...]:
        """The robots messages go to: ``robots``, or the one of ``url`` and ``secret``."""
        if self.robots:
            return self.robots
        assert self.url is not None, "checked by _url_or_robots"
        return (Robot(url=self.url, secret=self.secret),)

    def pool_size(self) -> int:
        return len(self.pool)

    def effective_rate_limit(self) -> RateLimit:
        # A robot takes 20 messages a minute and is then throttled for 10 minutes (each robot of a pool).
        return self.rate_limit or RateLimit(per_minute=20)

    def secret_values(self) -> tuple[str, ...]:
        robots = (v.get_secret_value() for r in self.robots for v in (r.url, r.secret) if v is not None)
        return (*super().secret_values(), *robots)

    def truncated(self, payload: Mapping[str, Any]) -> bool:
        body = payload.get(payload.get("msgtype", ""), {})
        return str(body.get("text") or body.get("content") or "").endswith(TRUNCATION_MARKER)

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        title = one_line(parts["title"])
        mentions = [f"@{m}" for m in (*self.at_mobiles, *self.at_user_ids)]
        at = {"atMobiles": list(self.at_mobiles), "atUserIds": list(self.at_user_ids), "isAtAll": self.at_all}

        def body(text: str) -> dict[str, Any]:
            # DingTalk only notifies mentioned people whose @ also appears in the text.
            missing = [m for m in mentions if m not in text]
            if missing:
                text = f"{text.rstrip()}\n\n{' '.join(missing)}"
            if self.msgtype == "text":
                return {"msgtype": "text", "text": {"content": f"{title}\n{text}"}, "at": at}
            if self.msgtype == "actionCard" and _http_url(parts.get("button_url", "")):
                card = {
                    "title": title,
                    "text": text,
                    "singleTitle": one_line(parts.get("button_title", "")) or "Details",
                    "singleURL": parts["button_url"].strip(),
                }
                return {"msgtype": "actionCard", "actionCard": card, "at": at}
            return {"msgtype": "markdown", "markdown": {"title": title, "text": text}, "at": at}

        payload = body(parts["text"])
        size = len(orjson.dumps(payload))
        if size > MAX_BODY_BYTES:
            # Cut the text in proportion to its encoded share (Chinese is 3 bytes a character and JSON
            # escapes grow), retrying until it fits; the marker shows the cut.
            raw = parts["text"].encode()
            fixed = len(orjson.dumps(body(TRUNCATION_MARKER)))
            while size > MAX_BODY_BYTES and raw:
                share = (MAX_BODY_BYTES - fixed) / max(1, size - fixed)
                raw = raw[: int(len(raw) * min(share, 0.98))]
                payload = body(raw.decode(errors="ignore") + TRUNCATION_MARKER)
                size = len(orjson.dumps(payload))
        return payload


def _http_url(text: str) -> bool:
    """Whether a button may point there: http(s) only (a template could have put ``javascript:`` in it)."""
    parts = urlsplit(text.strip())
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def sign(secret: str, timestamp_ms: int) -> str:
    """base64(HMAC-SHA256(key=secret, msg="<timestamp_ms>\\n<secret>")); yarl percent-encodes it in the query."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class DingTalkChannel:
    """Posts each payload to a robot, signed per request; the errcode in the answer decides. With a pool,
    the delivery stage picks the robot (``send_via``): the one whose window has room."""

    def __init__(self, name: str, config: DingTalkConfig) -> None:
        self.name = name
        self.config = config
        self._robots = [(URL(r.url.get_secret_value()), r.secret) for r in config.pool]
        self._http = HttpClient(name, config.timeout_seconds, Scrubber(config.secret_values()))

    def _url(self, member: int) -> URL:
        url, secret = self._robots[member]
        if secret is None:
            return url
        # DingTalk accepts a signature for an hour; computing it per request keeps it fresh.
        timestamp = int(time.time() * 1000)
        return url.extend_query(timestamp=str(timestamp), sign=sign(secret.get_secret_value(), timestamp))

    async def _post(self, member: int, body: bytes) -> tuple[int, str]:
        answer = await self._http.request(
            "POST", self._url(member), body=body, headers={"Content-Type": "application/json; charset=utf-8"}
        )
        if answer.status != 200:
            retriable = answer.status == 429 or answer.status >= 500
            raise self._error(answer.describe(), retriable)
        return self._errcode(answer)

    def _errcode(self, answer: Answer) -> tuple[int, str]:
        try:
            doc = orjson.loads(answer.body)
            return int(doc["errcode"]), str(doc.get("errmsg", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # Not the robot API talking (a proxy's error page, say): it may be back later.
            raise self._error(f"unexpected answer: {answer.describe()}", True) from None

    def _error(self, message: str, retriable: bool) -> DeliveryError:
        return DeliveryError(self._http.scrub(message), retriable=retriable, channel=self.name)

    async def send(self, notification: Notification) -> None:
        await self.send_via(0, notification)

    async def send_via(self, member: int, notification: Notification) -> None:
        try:
            errcode, errmsg = await self._post(member, orjson.dumps(notification.payload))
            if errcode != 0:
                raise self._error(f"errcode {errcode}: {errmsg}", errcode in RETRIABLE_ERRCODES)
        except DeliveryError as err:
            if len(self._robots) == 1:
                raise
            # Which robot of the pool (by position: its URL is a secret).
            raise self._error(f"robot {member + 1} of {len(self._robots)}: {err.reason}", err.retriable) from None

    async def health(self) -> str:
        # Reachability only: a request to the robot, even a refused one, might count against its 20 a minute.
        hosts = {(url.host, url.port): url for url, _ in self._robots}
        reachable = "; ".join([await self._http.reachable(url) for url in hosts.values()])
        return f"{reachable}; nothing sent, so the access_token and secret are not verified"

    async def close(self) -> None:
        await self._http.close()
