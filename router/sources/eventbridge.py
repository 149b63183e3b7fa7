"""EventBridge HTTP targets and any CloudEvents HTTP sender: authenticate the request, split it into the
records the Kafka source topic gets.

Modes (CloudEvents HTTP binding): structured (``application/cloudevents+json``, one event), batch
(``application/cloudevents-batch+json``, an array), binary (``ce-*`` headers, the data as the body).
EventBridge's own HTTP target posts the event as ``application/json``: an object is taken as structured,
an array as a batch. Binary mode becomes the CloudEvents Kafka binding's ``ce_*`` headers.

Authentication: a fixed token in a header (EventBridge targets can add fixed headers) and/or an
HMAC-SHA256 of the body, hex (``sha256=`` prefix allowed) or base64. Whichever is configured is required.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from pydantic import Field, SecretStr, model_validator

from router.channels.base import Frozen
from router.errors import IngestRefused

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")


class EventBridgeIngestSettings(Frozen):
    enabled: bool = False
    token: SecretStr | None = Field(default=None, description="required in token_header when set")
    token_header: str = "X-Imm-Router-Token"
    hmac_key: SecretStr | None = Field(default=None, description="HMAC-SHA256 of the body required when set")
    hmac_header: str = "X-Imm-Router-Signature"

    @model_validator(mode="after")
    def _authenticated(self) -> EventBridgeIngestSettings:
        if self.enabled and self.token is None and self.hmac_key is None:
            raise ValueError("ingest.eventbridge needs token or hmac_key: the endpoint never accepts anonymous events")
        return self


@dataclass(frozen=True, slots=True)
class Record:
    """One event as it goes to Kafka."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def check_token(token: SecretStr, header: str, headers: Mapping[str, str]) -> None:
    """``header`` holds ``token`` (a ``Bearer`` prefix allowed), compared in constant time."""
    sent = headers.get(header, "").removeprefix("Bearer ").strip()
    if not sent:
        raise IngestRefused(403, "token", f"{header} header missing")
    if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise IngestRefused(403, "token", f"wrong token in {header}")


def authenticate(settings: EventBridgeIngestSettings, headers: Mapping[str, str], body: bytes) -> None:
    if settings.token is not None:
        check_token(settings.token, settings.token_header, headers)
    if settings.hmac_key is not None:
        sent = headers.get(settings.hmac_header, "").strip()
        if not sent:
            raise IngestRefused(403, "hmac", f"{settings.hmac_header} header missing")
        digest = hmac.new(settings.hmac_key.get_secret_value().encode(), body, hashlib.sha256).digest()
        hexed = sent.removeprefix("sha256=").lower()
        if not (
            hmac.compare_digest(hexed.encode(), digest.hex().encode())
            or hmac.compare_digest(sent.encode(), base64.b64encode(digest))
        ):
            raise IngestRefused(403, "hmac", f"{settings.hmac_header} is not the HMAC-SHA256 of the body")


def records(headers: Mapping[str, str], body: bytes) -> list[Record]:
    """The Kafka records of one request; raises IngestRefused(400) naming what is wrong."""
    media = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    attributes = {k.lower()[3:]: v for k, v in headers.items() if k.lower().startswith("ce-")}
    if attributes and media not in (STRUCTURED, BATCH):
        return [_binary(attributes, headers.get("Content-Type"), body)]
    doc = json_body(body)
    if media == BATCH or (media != STRUCTURED and isinstance(doc, list)):
        if not isinstance(doc, list):
            raise IngestRefused(400, "batch", "a CloudEvents batch is a JSON array of events")
        if not doc:
            raise IngestRefused(400, "batch", "the batch holds no event")
        return [_structured(item, orjson.dumps(item), f"event [{i}]") for i, item in enumerate(doc)]
    return [_structured(doc, body, "event")]


def _structured(event: object, value: bytes, what: str) -> Record:
    # Whether it is an IMM event (a CloudEvent, or EventBridge's "partial event" such as $.data) the
    # decoder checks before anything is produced.
    if not isinstance(event, dict):
        raise IngestRefused(400, "event", f"{what} is not a JSON object")
    key = str(event["id"]).encode() if event.get("id") else None
    media = STRUCTURED if "specversion" in event else "application/json"
    return Record(key, value, (("content-type", media.encode()),))


def _binary(attributes: dict[str, str], content_type: str | None, body: bytes) -> Record:
    missing = [a for a in REQUIRED if not attributes.get(a)]
    if missing:
        raise IngestRefused(
            400, "event", f"binary-mode CloudEvent lacks header(s) {', '.join('ce-' + a for a in missing)}"
        )
    headers = [(f"ce_{name}", value.encode()) for name, value in attributes.items()]
    if content_type:
        headers.append(("content-type", content_type.encode()))
    return Record(attributes["id"].encode(), body, tuple(headers))


def json_body(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestRefused(400, "json", f"body is not valid JSON: {str(exc)[:200]}") from None
