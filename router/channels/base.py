"""What every channel shares: its config base, the parts a template must render, and the protocol."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from yarl import URL

from router.notification import Notification


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class RateLimit(Frozen):
    per_minute: int = Field(gt=0)
    burst: int | None = Field(
        default=None, gt=0, description="at most this many back to back (in burst/per_minute of a minute)"
    )

    @model_validator(mode="after")
    def _burst_within_minute(self) -> RateLimit:
        if self.burst is not None and self.burst > self.per_minute:
            raise ValueError("burst cannot exceed per_minute: at most per_minute messages go out in any minute")
        return self


class RetryPolicy(Frozen):
    attempts: int = Field(default=5, ge=1, description="attempts in all, the first included")
    initial_backoff_seconds: float = Field(default=0.5, gt=0)
    max_backoff_seconds: float = Field(default=30.0, gt=0)
    budget_seconds: float = Field(default=300.0, gt=0, description="give up after this long")


class CircuitBreaker(Frozen):
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open it")
    reset_seconds: float = Field(default=30.0, gt=0, description="how long it stays open before a trial")


class ChannelConfigBase(Frozen):
    """Fields every channel type accepts. Subclasses narrow ``type`` to ``Literal["<their type>"]`` (the
    discriminator of ``channels``) and add their own settings."""

    # Template blocks this channel type needs, and the ones it uses when present.
    required_blocks: ClassVar[tuple[str, ...]] = ()
    optional_blocks: ClassVar[tuple[str, ...]] = ()

    type: str

    digest_template: str | None = Field(
        default=None, description="template for digests of rate-limited alerts; defaults to the shipped one"
    )
    rate_limit: RateLimit | None = None
    retry: RetryPolicy = RetryPolicy()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    digest_max_alerts: int = Field(default=50, ge=1, description="alerts listed in one digest message at most")
    concurrency: int = Field(default=4, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0, description="one delivery attempt, connecting included")

    @property
    def default_digest_template(self) -> str:
        return f"digest/{self.type}.j2"

    def effective_rate_limit(self) -> RateLimit | None:
        return self.rate_limit

    def pool_size(self) -> int:
        """Destinations behind this channel that each take ``effective_rate_limit`` (DingTalk robots of
        a pool); above 1 the channel is a PooledChannel."""
        return 1

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        """The exact payload the channel would send for these rendered template parts."""
        raise NotImplementedError

    def truncated(self, payload: Mapping[str, Any]) -> bool:
        """Whether ``build_payload`` had to cut this payload (a digest must then list fewer alerts)."""
        return False

    def secret_values(self) -> tuple[str, ...]:
        """Every secret this config holds, for scrubbing error texts."""
        values = (getattr(self, name) for name in type(self).model_fields)
        return tuple(v.get_secret_value() for v in values if isinstance(v, SecretStr))


class PayloadMeta(Frozen):
    """Facts about the notification a payload builder may put on the wire."""

    event_id: str
    rule: str
    time: datetime | None = Field(default=None, description="the event's time; None for digests and groups")


_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)


def check_http_url(url: SecretStr) -> SecretStr:
    """A channel URL must be an absolute http(s) URL that every client library can use; checked at load so
    ``check`` refuses what ``run`` could not send to. The error never shows the URL (it holds tokens)."""
    text = url.get_secret_value()
    try:
        _HTTP_URL.validate_python(text)
        URL(text).port  # noqa: B018 - yarl validates the port lazily
    except ValidationError as exc:
        raise ValueError(f"not a usable http(s) URL: {exc.errors()[0]['msg']}") from None
    except ValueError as exc:
        raise ValueError(f"not a usable http(s) URL: {exc}") from None
    return url


def _readable_file(path: Path) -> Path:
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"file {path} {reason}; give the path of a PEM file the router can read")
    return path


# A configured CA, certificate or key: it must exist when the config is loaded, not at first use.
PemFile = Annotated[Path, AfterValidator(_readable_file)]


def tls_context(cafile: Path | None, certfile: Path | None = None, keyfile: Path | None = None) -> ssl.SSLContext:
    """A client TLS context; a file that is not PEM of the right kind raises ValueError naming it."""
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"CA file {cafile} cannot be loaded: {exc}") from None
    if certfile:
        try:
            context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"certificate {certfile} / key {keyfile} cannot be loaded: {exc}") from None
    return context


def one_line(text: str) -> str:
    """Collapse all whitespace, newlines included: a subject or title can never inject a header."""
    return " ".join(text.split())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_value(text: str) -> str:
    """An event's value as one header line: control characters (CR and LF above all) percent-encoded, so
    an event id can neither inject a header nor make the request impossible to send."""
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", text)


class Scrubber:
    """Replaces secrets in a text with ``***``: library exception texts can carry a URL with its token.

    Besides each secret as given it matches the encodings a client library may print (percent-encoded,
    yarl-normalised URLs) and, for URLs, each query value (where webhook tokens live)."""

    MASK = "***"

    def __init__(self, secrets: Iterable[str]) -> None:
        variants: set[str] = set()
        for secret in filter(None, secrets):
            variants |= _encodings(secret)
            parts = urlsplit(secret)
            if parts.scheme and parts.netloc:
                variants.add(str(URL(secret)))
                # Short query values ("v=1") are too common to mask without mangling every message.
                raw = [pair.partition("=")[2] for pair in parts.query.split("&")]
                for value in {*raw, *(unquote(v) for v in raw), *(v for _, v in parse_qsl(parts.query))}:
                    if len(value) >= 6:
                        variants |= _encodings(value)
                if parts.password:
                    variants |= _encodings(parts.password)
        ordered = sorted(variants, key=len, reverse=True)  # longest first: a URL before the token inside it
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(self.MASK, text) if self._pattern else text


def _encodings(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}


class Channel(Protocol):
    """A destination. ``send`` makes exactly one attempt and raises DeliveryError on failure.

    A channel class may set ``health_verifies_credentials = True`` when a healthy ``health()`` means its
    credentials work too; without it, ``check --live`` calls a healthy channel only "reachable"."""

    name: str

    async def send(self, notification: Notification) -> None: ...

    async def health(self) -> str:
        """Raise DeliveryError when unhealthy; return a short description when healthy."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class PooledChannel(Channel, Protocol):
    """A channel over several destinations with a rate limit each: the delivery stage picks the member."""

    async def send_via(self, member: int, notification: Notification) -> None:
        """``send`` through member ``member`` (0-based, below the config's ``pool_size()``)."""
        ...
