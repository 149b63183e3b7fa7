"""Email over SMTP (aiosmtplib): multipart text + html, STARTTLS or implicit TLS, AUTH."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr

from router.channels.base import ChannelConfigBase, PayloadMeta, one_line


class EmailConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("subject", "text")
    optional_blocks: ClassVar[tuple[str, ...]] = ("html",)

    type: Literal["email"]
    host: str
    port: int = Field(default=587, gt=0, lt=65536)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    ca_file: Path | None = None
    verify: bool = Field(default=True, description="verify the server certificate (keep it on)")
    username: str | None = None
    password: SecretStr | None = None
    from_: str = Field(alias="from")
    to: tuple[str, ...] = Field(min_length=1)

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        return {
            "from": self.from_,
            "to": list(self.to),
            "subject": one_line(parts["subject"]),
            "text": parts["text"],
            "html": parts.get("html") or None,
            "headers": {"X-IMM-Event-Id": meta.event_id, "X-IMM-Rule": meta.rule},
        }
