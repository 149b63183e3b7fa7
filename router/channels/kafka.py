"""Kafka topic channel (aiokafka producer): key, value and headers from the template."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field

from router.channels.base import ChannelConfigBase, PayloadMeta


class KafkaChannelConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("value",)
    optional_blocks: ClassVar[tuple[str, ...]] = ("key",)

    type: Literal["kafka"]
    topic: str = Field(min_length=1)
    bootstrap_servers: str | None = Field(default=None, description="defaults to the source's")
    acks: Literal["all", "1", "0"] = "all"
    idempotent: bool = False
    linger_ms: int = Field(default=5, ge=0)

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "key": parts.get("key", "").strip() or meta.event_id,
            "value": parts["value"].strip(),
            "headers": {"imm-event-id": meta.event_id, "imm-rule": meta.rule},
        }
