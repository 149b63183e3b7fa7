"""What every channel shares: its config base, the parts a template must render, and the protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from router.notification import Notification


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class RateLimit(Frozen):
    per_minute: int = Field(gt=0)
    burst: int | None = Field(default=None, gt=0, description="bucket size; defaults to per_minute")


class RetryPolicy(Frozen):
    attempts: int = Field(default=5, ge=1, description="attempts in all, the first included")
    initial_backoff_seconds: float = Field(default=0.5, gt=0)
    max_backoff_seconds: float = Field(default=30.0, gt=0)
    budget_seconds: float = Field(default=300.0, gt=0, description="give up after this long")


class CircuitBreaker(Frozen):
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open it")
    reset_seconds: float = Field(default=30.0, gt=0, description="how long it stays open before a trial")


class ChannelConfigBase(Frozen):
    """Fields every channel type accepts. Subclasses add ``type`` and their own settings."""

    # Template blocks this channel type needs, and the ones it uses when present.
    required_blocks: ClassVar[tuple[str, ...]] = ()
    optional_blocks: ClassVar[tuple[str, ...]] = ()

    digest_template: str | None = Field(
        default=None, description="template for digests of rate-limited alerts; defaults to the shipped one"
    )
    rate_limit: RateLimit | None = None
    retry: RetryPolicy = RetryPolicy()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    concurrency: int = Field(default=4, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)

    @property
    def default_digest_template(self) -> str:
        return f"digest/{getattr(self, 'type', 'generic')}.j2"

    def effective_rate_limit(self) -> RateLimit | None:
        return self.rate_limit

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        """The exact payload the channel would send for these rendered template parts."""
        raise NotImplementedError


class PayloadMeta(Frozen):
    """Facts about the notification a payload builder may put on the wire."""

    event_id: str
    rule: str


def one_line(text: str) -> str:
    """Collapse all whitespace, newlines included: a subject or title can never inject a header."""
    return " ".join(text.split())


class Channel(Protocol):
    """A destination. ``send`` makes exactly one attempt and raises DeliveryError on failure."""

    name: str

    async def send(self, notification: Notification) -> None: ...

    async def health(self) -> str:
        """Raise DeliveryError when unhealthy; return a short description when healthy."""
        ...

    async def close(self) -> None: ...
