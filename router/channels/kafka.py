"""Kafka topic channel (aiokafka producer): key, value and headers from the template."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from pydantic import Field

from router.channels.base import ChannelConfigBase, PayloadMeta, Scrubber
from router.errors import DeliveryError, RenderError
from router.notification import Notification
from router.partitioner import default_partition

if TYPE_CHECKING:  # router.config imports this module
    from router.config import KafkaSettings


class KafkaChannelConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("value",)
    optional_blocks: ClassVar[tuple[str, ...]] = ("key",)

    type: Literal["kafka"]
    topic: str = Field(min_length=1)
    bootstrap_servers: str | None = Field(default=None, description="defaults to the source's")
    acks: Literal["all", "1", "0"] = "all"
    idempotent: bool = Field(default=False, description="aiokafka's idempotent producer; Tansu does not support it")
    linger_ms: int = Field(default=5, ge=0)
    max_batch_bytes: int = Field(default=1_048_576, gt=0)
    max_value_bytes: int = Field(
        default=1_000_000, gt=0, description="a larger alert is a render error, not a record the broker refuses"
    )

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        value = parts["value"].strip()
        size = len(value.encode())
        if size > self.max_value_bytes:
            raise RenderError(
                f"the alert is {size} bytes, over the channel's max_value_bytes ({self.max_value_bytes}); "
                "list less of the event in the template (the `compact` filter clips lists and strings)"
            )
        return {
            "topic": self.topic,
            "key": parts.get("key", "").strip() or meta.event_id,
            "value": value,
            "headers": {"imm-event-id": meta.event_id, "imm-rule": meta.rule},
        }


class KafkaChannel:
    """Produces each payload with one long-lived producer, started on first use.

    The source's client id and SASL / SSL settings apply; ``bootstrap_servers`` may point elsewhere."""

    health_verifies_credentials = True  # a metadata request authenticates (SASL)

    def __init__(self, name: str, config: KafkaChannelConfig, kafka: KafkaSettings) -> None:
        self.name = name
        self.config = config
        self._kafka = kafka
        secrets = (*config.secret_values(), kafka.sasl_password.get_secret_value() if kafka.sasl_password else "")
        self._scrub = Scrubber(secrets)
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                cfg = self.config
                options = self._kafka.client_options()
                options["client_id"] += f"-{self.name}"
                if cfg.bootstrap_servers:
                    options["bootstrap_servers"] = cfg.bootstrap_servers
                producer = AIOKafkaProducer(
                    acks="all" if cfg.acks == "all" else int(cfg.acks),
                    enable_idempotence=cfg.idempotent,
                    linger_ms=cfg.linger_ms,
                    # Alerts are ~1-2 KB: the 16 KB default batch caps a storm at a few hundred a second.
                    max_batch_size=cfg.max_batch_bytes,
                    partitioner=default_partition,
                    request_timeout_ms=int(cfg.timeout_seconds * 1000),
                    **options,
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    def _error(self, exc: Exception) -> DeliveryError:
        # aiokafka marks which of its errors are transient; a send that timed out may go through next time.
        if isinstance(exc, KafkaError):
            retriable, text = exc.retriable or isinstance(exc, KafkaTimeoutError), str(exc)  # str names the class
        else:
            retriable, text = True, f"{type(exc).__name__}: {exc}"
        return DeliveryError(self._scrub(text), retriable=retriable, channel=self.name)

    async def send(self, notification: Notification) -> None:
        payload = notification.payload
        try:
            producer = self._producer or await self._started()
            await producer.send_and_wait(
                payload["topic"],
                value=payload["value"].encode(),
                key=payload["key"].encode(),
                headers=[(k, v.encode()) for k, v in payload["headers"].items()],
            )
        except (KafkaError, OSError) as exc:
            raise self._error(exc) from None

    async def health(self) -> str:
        try:
            producer = await self._started()
            metadata = await producer.client.fetch_all_metadata()
        except (KafkaError, OSError) as exc:
            raise self._error(exc) from None
        partitions = metadata.partitions_for_topic(self.config.topic)
        topic = f"{len(partitions)} partition(s)" if partitions else "not found (a broker may create it on first send)"
        return f"{len(metadata.brokers())} broker(s) answered metadata; topic {self.config.topic}: {topic}"

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
