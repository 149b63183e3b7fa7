"""Where events come in over HTTP: ``POST /ingest/mns`` (MNS push subscriptions, router.sources.mns),
``POST /ingest/eventbridge`` (EventBridge HTTP targets and CloudEvents senders, router.sources.eventbridge)
and ``POST /ingest/alertmanager`` (Prometheus Alertmanager's webhook, router.sources.alertmanager), on the
router's HTTP server.

At least once: an event is answered 2xx only after the source topic has it (``acks=all``); the routing
stage then takes it like any record, so dead letters, grouping and replay apply. Before anything is
produced the request is authenticated (403), its events are decoded as the routing stage will (400
naming the problem; a batch is all or nothing) and every refusal is counted by reason. Kafka unreachable
or slower than ``produce_timeout_seconds``, or more than ``max_in_flight`` requests at once: 503 with
``Retry-After``, so memory stays bounded and the sender keeps the event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import Field

from router.channels.base import Frozen
from router.decode import decode
from router.errors import DecodeError, IngestRefused
from router.metrics import Metrics
from router.sources import alertmanager, eventbridge, mns
from router.sources.alertmanager import AlertmanagerIngestSettings
from router.sources.eventbridge import EventBridgeIngestSettings, Record
from router.sources.mns import MnsIngestSettings

if TYPE_CHECKING:
    from router.engine import Engine

log = logging.getLogger(__name__)

ENDPOINTS = ("mns", "eventbridge", "alertmanager")
LOG_EVERY_SECONDS = 10.0


class IngestSettings(Frozen):
    mns: MnsIngestSettings = MnsIngestSettings()
    eventbridge: EventBridgeIngestSettings = EventBridgeIngestSettings()
    alertmanager: AlertmanagerIngestSettings = AlertmanagerIngestSettings()
    topic: str | None = Field(default=None, description="the source topic events go to; default kafka.topics[0]")
    max_in_flight: int = Field(default=256, ge=1, description="requests handled at once; beyond, 503")
    produce_timeout_seconds: float = Field(default=5.0, gt=0, description="Kafka slower than this: 503")
    retry_after_seconds: int = Field(default=5, ge=1)

    @property
    def enabled(self) -> bool:
        return self.mns.enabled or self.eventbridge.enabled or self.alertmanager.enabled


Parser = Callable[[web.Request, bytes, IngestSettings], Awaitable[list[Record]]]


class HttpIngest:
    """The endpoints. Settings, limits and the producer are looked up per request: a reload may change
    tokens or prefixes, and the service connects its producer once Kafka answers (503 until then)."""

    def __init__(
        self, engine: Callable[[], Engine], producer: Callable[[], AIOKafkaProducer | None], metrics: Metrics
    ) -> None:
        self.engine = engine
        self.producer = producer
        self.metrics = metrics
        self.certificates = mns.CertificateStore()
        self.in_flight = 0
        self._logged: dict[tuple[str, str], float] = {}
        self._sending: set[asyncio.Future[None]] = set()

    def add_routes(self, app: web.Application) -> list[str]:
        parsers: dict[str, Parser] = {
            "mns": self._mns,
            "eventbridge": self._eventbridge,
            "alertmanager": self._alertmanager,
        }
        paths = []
        for endpoint in ENDPOINTS:
            path = f"/ingest/{endpoint}"
            app.router.add_post(path, self._handler(endpoint, parsers[endpoint]))
            paths.append(path)
        return paths

    async def close(self) -> None:
        await self.certificates.close()

    def _handler(self, endpoint: str, parse: Parser) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            engine = self.engine()
            ingest = engine.settings.ingest
            if not getattr(ingest, endpoint).enabled:
                raise web.HTTPNotFound(text=f"ingest.{endpoint} is not enabled\n")
            if self.in_flight >= ingest.max_in_flight:
                return self._refuse(endpoint, ingest, IngestRefused(503, "busy", "too many requests in flight"))
            self.in_flight += 1
            self.metrics.ingest_in_flight.inc()
            try:
                body = await _read(request, engine.limits.max_bytes)
                records = await parse(request, body, ingest)
                for index, record in enumerate(records):
                    where = f"{endpoint} event" + (f" [{index}]" if len(records) > 1 else "")
                    try:
                        decode(record.value, record.headers, limits=engine.limits, source=where)
                    except DecodeError as exc:
                        raise IngestRefused(400, "decode", str(exc)) from None
                topic = ingest.topic or engine.settings.kafka.topics[0]
                tag = ("imm-ingest", endpoint.encode())
                await self._produce(topic, [(r.key, r.value, [*r.headers, tag]) for r in records], ingest)
            except IngestRefused as exc:
                return self._refuse(endpoint, ingest, exc)
            finally:
                self.in_flight -= 1
                self.metrics.ingest_in_flight.dec()
            self.metrics.ingest_requests.labels(endpoint, "204").inc()
            self.metrics.ingest_events.labels(endpoint).inc(len(records))
            return web.Response(status=204)

        return handle

    async def _mns(self, request: web.Request, body: bytes, ingest: IngestSettings) -> list[Record]:
        await mns.verify(self.certificates, ingest.mns, request.method, request.raw_path, request.headers, body)
        message = mns.message(body)
        return [Record(message.message_id.encode() if message.message_id else None, message.body, ())]

    async def _eventbridge(self, request: web.Request, body: bytes, ingest: IngestSettings) -> list[Record]:
        eventbridge.authenticate(ingest.eventbridge, request.headers, body)
        return eventbridge.records(request.headers, body)

    async def _alertmanager(self, request: web.Request, body: bytes, ingest: IngestSettings) -> list[Record]:
        alertmanager.authenticate(ingest.alertmanager, request.headers)
        return alertmanager.records(body)

    async def _produce(
        self, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]], ingest: IngestSettings
    ) -> None:
        """Every record in the topic, acknowledged by the broker (the producer is acks=all), or IngestRefused."""
        producer = self.producer()
        if producer is None:
            raise IngestRefused(503, "kafka", "Kafka is not connected yet")
        timeout = ingest.produce_timeout_seconds
        # Waited on from outside rather than cancelled at the deadline: while the broker is away the
        # producer's metadata wait does not give up when cancelled.
        sending = asyncio.ensure_future(_send(producer, topic, records))
        self._sending.add(sending)
        sending.add_done_callback(self._sent)
        done, _ = await asyncio.wait({sending}, timeout=timeout)
        if not done:
            sending.cancel()
            raise IngestRefused(503, "kafka", f"Kafka did not confirm within {timeout:g}s")
        error = sending.exception()
        if isinstance(error, KafkaError):
            raise IngestRefused(503, "kafka", f"Kafka did not take the event: {type(error).__name__}")
        if error is not None:
            raise error

    def _sent(self, sending: asyncio.Future[None]) -> None:
        self._sending.discard(sending)
        if not sending.cancelled():
            sending.exception()  # retrieved: a late failure after a 503 is not an unhandled error

    def _refuse(self, endpoint: str, ingest: IngestSettings, refused: IngestRefused) -> web.Response:
        self.metrics.ingest_requests.labels(endpoint, str(refused.status)).inc()
        self.metrics.ingest_refused.labels(endpoint, refused.reason).inc()
        now = time.monotonic()
        if now - self._logged.get((endpoint, refused.reason), -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._logged[(endpoint, refused.reason)] = now  # at most one line per reason every 10 s
            log.warning(
                "ingest %s: %d %s (%s; further ones counted only)", endpoint, refused.status, refused, refused.reason
            )
        headers: Mapping[str, str] = {"Retry-After": str(ingest.retry_after_seconds)} if refused.status == 503 else {}
        return web.Response(status=refused.status, text=f"{refused}\n", headers=headers)


async def _send(
    producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]
) -> None:
    sent = [await producer.send(topic, value=v, key=k, headers=h) for k, v, h in records]
    await asyncio.gather(*sent)


async def _read(request: web.Request, limit: int) -> bytes:
    too_large = IngestRefused(400, "too_large", f"body is over the {limit}-byte limit (max_event_bytes)")
    length = request.content_length
    if length is not None:
        if length > limit:
            raise too_large
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise IngestRefused(400, "body", "body shorter than its Content-Length") from None
    body = bytearray()  # chunked: bounded as it comes
    async for chunk in request.content.iter_chunked(65_536):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
