"""DingTalk custom group robot: signed requests, markdown / text / actionCard, @mentions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import Field, SecretStr, field_validator

from router.channels.base import ChannelConfigBase, PayloadMeta, RateLimit, one_line

# DingTalk refuses bodies over 20,000 bytes (errcode 460101); stay clear of it.
MAX_BODY_BYTES = 19_000
TRUNCATION_MARKER = "\n\n…(truncated)"


class DingTalkConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("title", "text")
    optional_blocks: ClassVar[tuple[str, ...]] = ("button_title", "button_url")

    type: Literal["dingtalk"]
    url: SecretStr = Field(description="robot webhook URL with access_token: a secret")
    secret: SecretStr | None = Field(default=None, description="signing secret (加签)")
    msgtype: Literal["markdown", "text", "actionCard"] = "markdown"
    at_mobiles: tuple[str, ...] = ()
    at_user_ids: tuple[str, ...] = ()
    at_all: bool = False

    @field_validator("url")
    @classmethod
    def _has_token(cls, url: SecretStr) -> SecretStr:
        query = dict(parse_qsl(urlsplit(url.get_secret_value()).query))
        if not query.get("access_token"):
            raise ValueError("url must carry ?access_token=… (the robot's webhook address)")
        return url

    def effective_rate_limit(self) -> RateLimit:
        # A robot takes 20 messages a minute and is then throttled for 10 minutes.
        return self.rate_limit or RateLimit(per_minute=20)

    def redacted_url(self) -> str:
        parts = urlsplit(self.url.get_secret_value())
        query = [(k, "***" if k == "access_token" else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query)))

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
            if self.msgtype == "actionCard" and parts.get("button_url", "").strip():
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
