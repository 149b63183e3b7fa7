"""Prometheus Alertmanager: each notification is one alert posted to ``/api/v2/alerts`` of every URL.

Alertmanager then groups, silences, inhibits and routes IMM alerts beside everything else it receives.
An IMM event never resolves by itself, so the alert carries ``endsAt = startsAt + resolve_after``.
As Prometheus does with an HA pair, the alert goes to every URL and counts as delivered when one of them
took it (an HA pair gossips it to the other); the URLs that failed are logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from yarl import URL

from router.channels.base import ChannelConfigBase, Frozen, PayloadMeta, PemFile, Scrubber, tls_context
from router.channels.http import HttpClient
from router.errors import DeliveryError, RenderError
from router.notification import Notification

log = logging.getLogger(__name__)

# Characters a Prometheus label name cannot have (Alertmanager refuses a request for one bad name).
NOT_IN_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


class BasicAuth(Frozen):
    username: str = Field(min_length=1)
    password: SecretStr

    def header(self) -> str:
        """The Authorization header value."""
        pair = f"{self.username}:{self.password.get_secret_value()}"
        return f"Basic {base64.b64encode(pair.encode()).decode()}"


class TlsOptions(Frozen):
    ca_file: PemFile | None = Field(default=None, description="CA bundle that signed the Alertmanagers' certificates")
    cert_file: PemFile | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: PemFile | None = None
    verify: bool = Field(default=True, description="verify the server certificate (keep it on)")

    @model_validator(mode="after")
    def _files_load(self) -> TlsOptions:
        self.context()  # checked at load: ValueError naming the file that is not PEM of the right kind
        return self

    def context(self) -> ssl.SSLContext:
        context = tls_context(self.ca_file, self.cert_file, self.key_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class AlertmanagerConfig(ChannelConfigBase):
    # labels and summary come from the shipped base template (templates/alertmanager/base.j2).
    required_blocks: ClassVar[tuple[str, ...]] = ("labels", "summary")
    optional_blocks: ClassVar[tuple[str, ...]] = ("description", "links", "generator_url")

    type: Literal["alertmanager"]
    url: tuple[AnyHttpUrl, ...] = Field(
        min_length=1, description="Alertmanager base URLs (all members of an HA pair); each gets every alert"
    )
    basic_auth: BasicAuth | None = None
    bearer_token: SecretStr | None = None
    tls: TlsOptions = TlsOptions()
    resolve_after: float = Field(
        default=3600.0, gt=0, description="endsAt = startsAt + this (events never resolve); 30m, 1h, 1d"
    )

    @field_validator("url", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("resolve_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        # Imported here: router.alerting.timing imports router.channels, whose registry imports this module.
        from router.alerting.timing import parse_duration

        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, urls: tuple[AnyHttpUrl, ...]) -> tuple[AnyHttpUrl, ...]:
        if any(u.username or u.password for u in urls):
            raise ValueError("put credentials in basic_auth, not in the URL")
        return urls

    @model_validator(mode="after")
    def _one_auth(self) -> AlertmanagerConfig:
        if self.basic_auth is not None and self.bearer_token is not None:
            raise ValueError("set basic_auth or bearer_token, not both")
        return self

    def secret_values(self) -> tuple[str, ...]:
        password = self.basic_auth.password.get_secret_value() if self.basic_auth else ""
        return (*super().secret_values(), password)

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        starts = meta.time or datetime.now(UTC)
        alert: dict[str, Any] = {
            "labels": {_label_name(k): v for k, v in _string_map(parts["labels"], "labels").items()},
            "annotations": {
                "summary": parts["summary"],
                "description": parts.get("description", ""),
                **_string_map(parts.get("links") or "{}", "links"),
            },
            "startsAt": starts.isoformat(),
            "endsAt": (starts + timedelta(seconds=self.resolve_after)).isoformat(),
        }
        alert["annotations"] = {k: v for k, v in alert["annotations"].items() if v}
        if "alertname" not in alert["labels"]:
            raise RenderError("alertmanager labels need an alertname (Alertmanager routes and groups by it)")
        generator = parts.get("generator_url", "").strip()
        if generator:
            alert["generatorURL"] = generator
        return {"alerts": [alert]}


def _label_name(key: str) -> str:
    """``imm.project`` → ``imm_project``: group keys and rule labels become valid label names."""
    name = NOT_IN_LABEL_NAME.sub("_", key)
    return f"_{name}" if not name or name[0].isdigit() else name


def _string_map(text: str, block: str) -> dict[str, str]:
    """A block rendered as a JSON object, as Alertmanager's string → string map; null and "" are left out."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RenderError(f"alertmanager {block} block is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RenderError(f"alertmanager {block} block must render a JSON object, not {type(doc).__name__}")
    out = {}
    for key, value in doc.items():
        if value is None or value == "":
            continue
        out[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return out


class AlertmanagerChannel:
    """POSTs ``[alert]`` to every URL at once; delivered when one accepted. 5xx, 429 and transport
    failures are retriable, other answers (a 400 for a malformed alert, a 401) are not."""

    # Readiness (GET /-/ready) with the configured credentials: a proxy in front refuses wrong ones.
    health_verifies_credentials = True

    def __init__(self, name: str, config: AlertmanagerConfig) -> None:
        self.name = name
        self.config = config
        self._bases = [URL(str(u).rstrip("/")) for u in config.url]
        self._headers = {"Content-Type": "application/json"}
        if config.basic_auth is not None:
            self._headers["Authorization"] = config.basic_auth.header()
        elif config.bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
        self._http: HttpClient | None = None

    def _client(self) -> HttpClient:
        if self._http is None:
            try:
                context = self.config.tls.context() if any(b.scheme == "https" for b in self._bases) else None
            except ValueError as exc:  # a TLS file changed since the config was loaded
                raise DeliveryError(str(exc), retriable=False, channel=self.name) from None
            scrub = Scrubber((*self.config.secret_values(), self._headers.get("Authorization", "")))
            self._http = HttpClient(self.name, self.config.timeout_seconds, scrub, tls=context)
        return self._http

    async def _post(self, http: HttpClient, base: URL, body: bytes) -> tuple[str, bool] | None:
        """None when ``base`` took the alert, else what went wrong and whether a retry can help."""
        try:
            answer = await http.request("POST", base / "api/v2/alerts", body=body, headers=self._headers)
        except DeliveryError as err:
            return f"{base}: {err.reason}", err.retriable
        if 200 <= answer.status < 300:
            return None
        return f"{base}: {http.scrub(answer.describe())}", answer.status == 429 or answer.status >= 500

    async def send(self, notification: Notification) -> None:
        http = self._client()
        body = orjson.dumps(notification.payload["alerts"])
        outcomes = await asyncio.gather(*(self._post(http, base, body) for base in self._bases))
        failed = [outcome for outcome in outcomes if outcome is not None]
        if len(failed) == len(self._bases):
            detail = "; ".join(text for text, _ in failed)
            raise DeliveryError(detail, retriable=any(retriable for _, retriable in failed), channel=self.name)
        for text, _ in failed:
            log.warning("%s: alert %s taken by another Alertmanager, not by %s", self.name, notification.event_id, text)

    async def health(self) -> str:
        """Every URL's readiness endpoint (GET /-/ready); healthy when one is ready, as for sending."""
        http = self._client()
        results = []
        for base in self._bases:
            try:
                answer = await http.request("GET", base / "-/ready", headers=self._headers)
                results.append((base, answer.describe(60) if answer.status != 200 else None))
            except DeliveryError as err:
                results.append((base, err.reason))
        ready = [base for base, problem in results if problem is None]
        detail = "; ".join(f"{base}: {problem or 'ready'}" for base, problem in results)
        if not ready:
            raise DeliveryError(detail, retriable=True, channel=self.name)
        return f"{len(ready)}/{len(results)} Alertmanager(s) ready: {detail}"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
