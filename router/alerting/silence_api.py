"""The silences HTTP API, served by the ops server (router.ops) next to /metrics:

- ``GET /api/v1/silences``: active and pending silences and those expired in the last day (no auth);
- ``POST /api/v1/silences``: add one (JSON: match, rule?, channel?, for or ends_at, starts_at?, comment,
  author) → 201 ``{"id": ...}``;
- ``DELETE /api/v1/silences/{id}``: expire one now → 200 with the silence.

Writes need ``Authorization: Bearer <http.api_token>``; without a configured token they are refused (403).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from router.alerting.silences import InvalidSilence, SilenceStore, UnknownSilence, check_names
from router.alerting.timing import parse_duration

log = logging.getLogger(__name__)

PATH = "/api/v1/silences"
FIELDS = ("match", "rule", "channel", "for", "ends_at", "starts_at", "comment", "author")
WRITES_DISABLED = (
    "silence writes are disabled: no API token is configured. Set http.api_token (a secret: e.g. "
    "`api_token: ${SILENCE_API_TOKEN}` in the config, or the environment variable ROUTER_HTTP__API_TOKEN) "
    "and send it as `Authorization: Bearer <token>`"
)

# The rule names and channel names of the running config.
Names = Callable[[], tuple[Collection[str], Collection[str]]]


class BadRequest(Exception):
    """The request body is not a silence; the message names the field."""


class SilenceAPI:
    def __init__(
        self,
        store: SilenceStore | Callable[[], SilenceStore | None] | None,
        token: SecretStr | Callable[[], SecretStr | None] | None,
        *,
        names: Names | None = None,
    ) -> None:
        """``store`` and ``token`` are values or functions giving the current ones: the service creates its
        store once Kafka answers, and a reload may change the token. ``names`` gives the config's rule and
        channel names, which a new silence's rule and channel must be among."""
        self._store = store
        self._token = token
        self._names = names

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.list_silences)
        app.router.add_post(PATH, self.add_silence)
        app.router.add_delete(PATH + "/{id}", self.expire_silence)

    # --- handlers ---------------------------------------------------------------------------------

    async def list_silences(self, _: web.Request) -> web.Response:
        store = self.store()
        if store is None:
            return _unavailable()
        now = datetime.now(UTC)
        return web.json_response([s.doc(now) for s in store.silences.listing(now)])

    async def add_silence(self, request: web.Request) -> web.Response:
        store = self.writable(request)
        if isinstance(store, web.Response):
            return store
        try:
            fields = parse_body(await request.read())
            if self._names is not None:
                rules, channels = self._names()
                check_names(fields.get("rule"), fields.get("channel"), rules, channels)
            silence = await store.add(**fields)
        except (BadRequest, InvalidSilence) as exc:
            return _error(400, str(exc))
        except (KafkaError, TimeoutError) as exc:
            return _error(503, f"the silence could not be written to Kafka: {exc or type(exc).__name__}")
        log.info("silence %s added through the API by %s: %s", silence.id, silence.author, silence.match)
        return web.json_response({"id": silence.id}, status=201)

    async def expire_silence(self, request: web.Request) -> web.Response:
        store = self.writable(request)
        if isinstance(store, web.Response):
            return store
        silence_id = request.match_info["id"]
        try:
            silence = await store.expire(silence_id)
        except UnknownSilence as exc:
            return _error(404, str(exc))
        except (KafkaError, TimeoutError) as exc:
            return _error(503, f"the silence could not be written to Kafka: {exc or type(exc).__name__}")
        log.info("silence %s expired through the API", silence.id)
        return web.json_response(silence.doc(datetime.now(UTC)))

    # --- helpers ----------------------------------------------------------------------------------

    def store(self) -> SilenceStore | None:
        return self._store() if callable(self._store) else self._store

    def writable(self, request: web.Request) -> SilenceStore | web.Response:
        """The store a write may go to, or the answer refusing the write (403/401, or 503 before Kafka)."""
        refused = self.refused(request)
        if refused is not None:
            return refused
        store = self.store()
        return _unavailable() if store is None else store

    def refused(self, request: web.Request) -> web.Response | None:
        """403 when no token is configured, 401 when the request's bearer token is missing or wrong."""
        token = self._token() if callable(self._token) else self._token
        expected = token.get_secret_value().encode() if token is not None else b""
        if not expected.strip():  # an empty token would let "Bearer " in
            return _error(403, WRITES_DISABLED)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            response = _error(401, "a valid `Authorization: Bearer <token>` header is required to change silences")
            response.headers["WWW-Authenticate"] = 'Bearer realm="imm-router"'
            return response
        return None


def parse_body(body: bytes) -> dict[str, Any]:
    """The keyword arguments of SilenceStore.add from a POST body; raises BadRequest naming the problem."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the body must be a JSON object with {', '.join(FIELDS)}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; a silence has {', '.join(FIELDS)}")
    for name in ("match", "comment", "author"):
        if name not in doc:
            raise BadRequest(f"{name} is required")
    for name, value in doc.items():
        optional = name not in ("match", "comment", "author")
        if not isinstance(value, str) and not (optional and value is None):
            raise BadRequest(f"{name} must be a string, not {type(value).__name__}")
    now = datetime.now(UTC)
    starts_at = _time(doc, "starts_at")
    if (doc.get("for") is None) == (doc.get("ends_at") is None):
        raise BadRequest('give either `for` (a duration, e.g. "2h") or `ends_at` (ISO 8601 with a time zone)')
    if doc.get("for") is not None:
        try:
            seconds = parse_duration(doc["for"])
        except ValueError as exc:
            raise BadRequest(f"for: {exc}") from None
        if seconds <= 0:
            raise BadRequest(f"for {doc['for']!r} must be longer than nothing, e.g. 2h")
        ends_at = (starts_at or now) + timedelta(seconds=seconds)
    else:
        ends_at = _time(doc, "ends_at") or now  # not None: checked above
    return {
        "match": doc["match"],
        "rule": doc.get("rule"),
        "channel": doc.get("channel"),
        "starts_at": starts_at,
        "ends_at": ends_at,
        "comment": doc["comment"],
        "author": doc["author"],
    }


def _time(doc: dict[str, Any], name: str) -> datetime | None:
    text = doc.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} {text!r} is not an ISO 8601 time, e.g. 2026-12-01T08:00:00+08:00") from None
    if moment.tzinfo is None:
        raise BadRequest(f"{name} {text!r} has no time zone: add one, e.g. 2026-12-01T08:00:00+08:00")
    return moment


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _unavailable() -> web.Response:
    return _error(503, "silences are not available yet: the router is still connecting to Kafka")
