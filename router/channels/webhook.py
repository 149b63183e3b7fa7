"""Generic webhook: POST of a templated JSON body, optional HMAC-SHA256 signature header."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AnyHttpUrl, Field, SecretStr

from router.channels.base import ChannelConfigBase, PayloadMeta
from router.errors import RenderError


class WebhookConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("body",)

    type: Literal["webhook"]
    url: SecretStr = Field(description="may carry a token, so it is treated as a secret")
    headers: dict[str, str] = Field(default_factory=dict)
    hmac_secret: SecretStr | None = None
    signature_header: str = "X-IMM-Signature"

    def validated_url(self) -> str:
        return str(AnyHttpUrl(self.url.get_secret_value()))

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        try:
            body = orjson.loads(parts["body"])
        except orjson.JSONDecodeError as exc:
            raise RenderError(f"webhook body is not valid JSON: {exc}") from exc
        headers = {"Content-Type": "application/json", **self.headers}
        headers |= {"X-IMM-Event-Id": meta.event_id, "X-IMM-Rule": meta.rule}
        return {"method": "POST", "headers": headers, "body": body}
