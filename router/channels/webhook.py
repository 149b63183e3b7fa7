"""Generic webhook: POST of a templated JSON body, optional HMAC-SHA256 signature header."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from yarl import URL

from router import jsoncodec
from router.channels.base import ChannelConfigBase, PayloadMeta, Scrubber, check_http_url, header_value
from router.channels.http import HttpClient
from router.errors import DeliveryError, RenderError
from router.notification import Notification


class WebhookConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("body",)

    type: Literal["webhook"]
    url: SecretStr = Field(description="may carry a token, so it is treated as a secret")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="values are secrets (Authorization: Bearer …): added at send time only"
    )
    hmac_secret: SecretStr | None = None
    signature_header: str = Field(
        default="X-IMM-Signature", description='"sha256=" + hex HMAC-SHA256 of the exact body bytes'
    )

    _url_usable = field_validator("url")(check_http_url)

    def validated_url(self) -> str:
        return str(AnyHttpUrl(self.url.get_secret_value()))

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        try:
            body = jsoncodec.loads(parts["body"])
        except orjson.JSONDecodeError as exc:
            raise RenderError(f"webhook body is not valid JSON: {exc}") from exc
        # The configured headers are not part of the payload: it is printed (route, replay --dry-run) and
        # travels through the notifications topic. The channel adds them when it sends.
        headers = {"X-IMM-Event-Id": header_value(meta.event_id), "X-IMM-Rule": header_value(meta.rule)}
        return {"method": "POST", "headers": headers, "body": body}

    def secret_values(self) -> tuple[str, ...]:
        # Short values ("1", "no") cannot be secrets and would mask every such word in an error text.
        configured = (v.get_secret_value() for v in self.headers.values())
        return (*super().secret_values(), *(v for v in configured if len(v) >= 4))


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookChannel:
    """POSTs the JSON body; the HTTP status decides: 2xx ok, 408/429/5xx later, anything else never."""

    def __init__(self, name: str, config: WebhookConfig) -> None:
        self.name = name
        self.config = config
        self._url = URL(config.validated_url())
        self._http = HttpClient(name, config.timeout_seconds, Scrubber(config.secret_values()))

    async def send(self, notification: Notification) -> None:
        payload = notification.payload
        body = jsoncodec.dumps(payload["body"])
        configured = {name: value.get_secret_value() for name, value in self.config.headers.items()}
        headers = {"Content-Type": "application/json", **configured, **payload["headers"]}
        if self.config.hmac_secret is not None:
            headers[self.config.signature_header] = signature(self.config.hmac_secret.get_secret_value(), body)
        answer = await self._http.request("POST", self._url, body=body, headers=headers)
        if 200 <= answer.status < 300:
            return
        retriable = answer.status in (408, 429) or answer.status >= 500
        # Redirects are not followed: a POST turned into a GET elsewhere is not a delivery.
        message = self._http.scrub(answer.describe())
        raise DeliveryError(message, retriable=retriable, channel=self.name)

    async def health(self) -> str:
        reachable = await self._http.reachable(self._url)
        return f"{reachable}; nothing sent, so the URL's path and token are not verified"

    async def close(self) -> None:
        await self._http.close()
