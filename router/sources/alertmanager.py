"""Prometheus Alertmanager's webhook receiver: authenticate the request, make one CloudEvent per alert.

Alertmanager posts a version-4 payload per notification of a group: ``receiver``, ``status``,
``groupLabels``, ``commonLabels``, ``commonAnnotations``, ``externalURL``, ``groupKey``,
``truncatedAlerts`` and ``alerts[]`` (``status``, ``labels``, ``annotations``, ``startsAt``,
``endsAt``, ``generatorURL``, ``fingerprint``). Each alert becomes a structured CloudEvent of type
``alertmanager:firing`` / ``alertmanager:resolved``; its data is the alert with every field present,
plus the notification around it under ``alertmanager``. The id is fingerprint, status and startsAt: a
notification Alertmanager retries, re-sends when the group changes, or that both members of an HA pair
send, carries the same ids, so the delivery stage's dedup passes each alert once per state. The key is
the fingerprint: an alert's firing and resolved events share a partition and keep their order.

Authentication: ``Authorization: Bearer <token>`` (Alertmanager's ``http_config.authorization``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import Field, SecretStr, model_validator

from router.channels.base import Frozen
from router.errors import IngestRefused
from router.imm import ALERT_CONTEXT
from router.sources.eventbridge import STRUCTURED, Record, check_token, json_body

VERSION = "4"
STATUSES = ("firing", "resolved")


class AlertmanagerIngestSettings(Frozen):
    enabled: bool = False
    token: SecretStr | None = Field(default=None, description="required as Authorization: Bearer <token>")

    @model_validator(mode="after")
    def _authenticated(self) -> AlertmanagerIngestSettings:
        if self.enabled and self.token is None:
            raise ValueError("ingest.alertmanager needs token: the endpoint never accepts anonymous alerts")
        return self


def authenticate(settings: AlertmanagerIngestSettings, headers: Mapping[str, str]) -> None:
    if settings.token is not None:
        check_token(settings.token, "Authorization", headers)


def records(body: bytes) -> list[Record]:
    """The Kafka records of one webhook notification; raises IngestRefused(400) naming what is wrong."""
    doc = json_body(body)
    if not isinstance(doc, dict):
        raise _malformed("an Alertmanager webhook payload is a JSON object")
    if "version" in doc and str(doc["version"]) != VERSION:
        version = doc["version"]
        raise IngestRefused(400, "version", f"webhook payload version {version!r}; this endpoint reads {VERSION}")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise _malformed("`alerts` is not a non-empty array")
    context = {key: doc.get(key, default) for key, default in ALERT_CONTEXT.items()}
    return [_record(alert, context, f"alerts[{i}]") for i, alert in enumerate(alerts)]


def _record(alert: object, context: dict[str, Any], where: str) -> Record:
    if not isinstance(alert, dict):
        raise _malformed(f"{where} is not a JSON object")
    status = alert.get("status")
    if status not in STATUSES:
        raise _malformed(f"{where}.status is {status!r}, not 'firing' or 'resolved'")
    labels = alert.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise _malformed(f"{where}.labels is not a non-empty object")
    annotations = alert.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise _malformed(f"{where}.annotations is not an object")
    starts, ends = alert.get("startsAt"), alert.get("endsAt") or ""
    if not isinstance(starts, str) or not starts or not isinstance(ends, str):
        raise _malformed(f"{where}.startsAt / endsAt are not RFC 3339 times")
    # Alertmanager's fingerprint is a hash of the labels; one of ours when a sender leaves it out.
    fingerprint = str(alert.get("fingerprint") or _fingerprint(labels))
    data = {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": starts,
        "endsAt": ends,
        "generatorURL": alert.get("generatorURL") or "",
        "fingerprint": fingerprint,
        "alertmanager": context,
    }
    event = {
        "specversion": "1.0",
        "id": f"{fingerprint}:{status}:{starts}",
        "source": context["externalURL"] or "alertmanager",
        "type": f"alertmanager:{status}",
        "subject": str(labels.get("alertname", "")),
        "time": ends if status == "resolved" and ends else starts,
        "datacontenttype": "application/json",
        "data": data,
    }
    return Record(fingerprint.encode(), orjson.dumps(event), (("content-type", STRUCTURED.encode()),))


def _fingerprint(labels: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(labels, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _malformed(message: str) -> IngestRefused:
    return IngestRefused(400, "payload", message)
