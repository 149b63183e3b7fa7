"""HTTP ingest (router.sources.http) against real servers: Tansu, the router's own HTTP server, and an
HTTPS server (trustme CA) holding a throw-away MNS signing certificate. Pushes are signed the way MNS
signs them by router.embedded.mns, written independently of the verifier.

Every seed example arrives as a notification on its channel in every MNS format and CloudEvents mode;
forged, misdirected, tampered, stale and unauthenticated requests are refused, counted by reason, and
produce nothing; a dead broker answers 503 until it is back; a router killed mid-stream never
acknowledged an event Kafka does not have.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import trustme
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric import rsa

from router.config import load_settings
from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.embedded.mns import FORMATS, MnsPublisher
from router.engine import load
from router.errors import ConfigError
from router.ops import OpsServer, secret_values
from router.service import Service
from router.sources.kafka import read_topic
from tests.conftest import EVENTS, ROOT
from tests.test_service import config, consume_until, wait_until

TOKEN = "eb-token-Zq81xT-secret"
HMAC_KEY = "eb-hmac-9f2kLw-secret"
MNS_SEEDS = sorted((EVENTS / "mns").glob("*.json"))
EB_SEEDS = sorted((EVENTS / "eventbridge").glob("*.json"))


@pytest_asyncio.fixture
async def publisher(ca: trustme.CA) -> AsyncIterator[MnsPublisher]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    async with MnsPublisher(tls) as server:
        yield server


def routing_rules(tmp_path: Path) -> Path:
    """MNS notifications to one Kafka channel, EventBridge / CloudEvents to another: the right channel."""
    rules = tmp_path / "ingest-rules"
    rules.mkdir(exist_ok=True)
    (rules / "r.yaml").write_text(
        "rules:\n"
        "  - name: from-mns\n    when: \"event.wire_format == 'mns'\"\n"
        "    notify: [{channel: mns-alerts, template: kafka/alert.json.j2}]\n"
        "  - name: from-eventbridge\n    when: \"event.wire_format != 'mns'\"\n"
        "    notify: [{channel: eb-alerts, template: kafka/alert.json.j2}]\n"
    )
    return rules


def ingest_config(
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    publisher: MnsPublisher,
    ca_pem_path: Path,
    *,
    port: int = 0,
    ingest: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    path = config(
        tmp_path,
        bootstrap,
        topic,
        rules_dir=routing_rules(tmp_path),
        channels={
            "mns-alerts": {"type": "kafka", "topic": f"{topic}-mns-alerts"},
            "eb-alerts": {"type": "kafka", "topic": f"{topic}-eb-alerts"},
        },
        service={"dedup_ttl_seconds": 0},  # the seeds share ids: every push must come out
    )
    doc = json.loads(path.read_text())
    doc["http"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    doc["ingest"] = {
        "mns": {"enabled": True, "cert_url_prefixes": [publisher.prefix], "ca_file": str(ca_pem_path)},
        "eventbridge": {"enabled": True, "token": TOKEN, "hmac_key": HMAC_KEY},
        **(ingest or {}),
    }
    path.write_text(json.dumps(doc | top))
    return path


@contextlib.asynccontextmanager
async def router(path: Path) -> AsyncIterator[tuple[Service, str]]:
    """A service with its HTTP server, connected to Kafka: (service, base URL)."""
    service = Service(load(path), path)
    ops = OpsServer(service, "127.0.0.1", 0)
    await ops.start()
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: service.routing is not None, what="the router connected to Kafka")
        yield service, f"http://127.0.0.1:{ops.port}"
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)
        await ops.stop()


def mns_message(seed: Path, event_id: str, *, b64: bool) -> bytes:
    """What IMM publishes to MNS for this seed (an envelope with escaped JSON content), maybe base64."""
    content = seed.read_text()
    if seed.stem.startswith("envelope-"):
        envelope = json.loads(content) | {"id": event_id}
    else:
        envelope = {
            "id": event_id,
            "source": "acs.imm",
            "type": "imm:Task:******",
            "subject": "",
            "time": "1724133063161",
            "content": content,
        }
    message = json.dumps(envelope).encode()
    return base64.b64encode(message) if b64 else message


def eb_headers(body: bytes, content_type: str, **extra: str) -> dict[str, str]:
    digest = hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": content_type,
        "X-Imm-Router-Token": TOKEN,
        "X-Imm-Router-Signature": f"sha256={digest}",
        **extra,
    }


def binary_request(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """CloudEvents HTTP binary mode: attributes as ce-* headers, the data as the body."""
    attributes = {"specversion": "1.0"} | {k: str(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
    body = json.dumps(event["data"]).encode()
    ce = {f"ce-{k}": v for k, v in attributes.items()}
    return eb_headers(body, event.get("datacontenttype", "application/json"), **ce), body


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    async with http.post(url, headers=headers, data=body) as response:
        return response.status, await response.text()


def event_ids(records: list[Any]) -> list[str]:
    return [dict(r.headers)["imm-event-id"].decode() for r in records]


async def test_every_seed_in_every_format_arrives_on_its_channel(
    tansu: TansuBroker, unique_topic, tmp_path: Path, publisher: MnsPublisher, ca_pem_path: Path
) -> None:
    topic = unique_topic("events")
    path = ingest_config(tmp_path, tansu.bootstrap_servers, topic, publisher, ca_pem_path)
    mns_ids: set[str] = set()
    eb_ids: set[str] = set()
    async with router(path) as (service, base), aiohttp.ClientSession() as http:
        for seed in MNS_SEEDS:
            for fmt in FORMATS:
                for b64 in (False, True):
                    event_id = f"{seed.stem}-{fmt}-{'base64' if b64 else 'plain'}"
                    body = publisher.body(mns_message(seed, event_id, b64=b64), fmt)
                    status, text = await post(http, f"{base}/ingest/mns", publisher.sign(body, fmt), body)
                    assert status == 204, f"{event_id}: {status} {text}"
                    mns_ids.add(event_id)
        batch = []
        for seed in EB_SEEDS:
            event = json.loads(seed.read_text())
            structured = json.dumps(event | {"id": f"{seed.stem}-structured"}).encode()
            status, text = await post(
                http, f"{base}/ingest/eventbridge", eb_headers(structured, "application/cloudevents+json"), structured
            )
            assert status == 204, f"{seed.stem} structured: {status} {text}"
            headers, body = binary_request(event | {"id": f"{seed.stem}-binary"})
            status, text = await post(http, f"{base}/ingest/eventbridge", headers, body)
            assert status == 204, f"{seed.stem} binary: {status} {text}"
            batch.append(event | {"id": f"{seed.stem}-batch"})
            eb_ids |= {f"{seed.stem}-structured", f"{seed.stem}-binary", f"{seed.stem}-batch"}
        body = json.dumps(batch).encode()
        status, text = await post(
            http, f"{base}/ingest/eventbridge", eb_headers(body, "application/cloudevents-batch+json"), body
        )
        assert status == 204, text
        for channel, expected in (("mns-alerts", mns_ids), ("eb-alerts", eb_ids)):
            records = await consume_until(
                tansu.bootstrap_servers,
                f"{topic}-{channel}",
                lambda records, expected=expected: expected <= set(event_ids(records)),  # type: ignore[misc]
                f"{len(expected)} notifications",
            )
            assert sorted(event_ids(records)) == sorted(expected), channel  # each once, none on the wrong channel
        assert service.metrics.ingest_events.labels("mns")._value.get() == len(mns_ids)
        assert service.metrics.ingest_events.labels("eventbridge")._value.get() == len(eb_ids)
    assert len(mns_ids) == len(MNS_SEEDS) * 6 and len(eb_ids) == len(EB_SEEDS) * 3
    assert publisher.fetched.items == ["/mns/cert.pem"]  # fetched once, then cached
    # What the decoder needs travels with the event: the binary mode's ce_* headers and imm-ingest.
    source = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    binary = next(dict(r.headers) for r in source if dict(r.headers).get("ce_id", b"").endswith(b"-binary"))
    assert binary["imm-ingest"] == b"eventbridge" and binary["ce_type"].startswith(b"imm:")
    assert {dict(r.headers)["imm-ingest"] for r in source} == {b"mns", b"eventbridge"}


def refusal_cases(
    publisher: MnsPublisher, other_key: rsa.RSAPrivateKey
) -> list[tuple[str, str, dict[str, str], bytes, int, str]]:
    """(name, endpoint, headers, body, status, reason) of requests that must be refused."""
    xml = publisher.body(mns_message(MNS_SEEDS[0], "refused", b64=False), "XML")
    signed = publisher.sign(xml, "XML")

    def cert(url: str) -> dict[str, str]:
        return publisher.sign(xml, "XML", cert_url=url)

    def md5(body: bytes) -> str:
        return base64.b64encode(hashlib.md5(body, usedforsecurity=False).hexdigest().encode()).decode()

    tampered = xml.replace(b"imm-tasks", b"imm-tasky")
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE n [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<Notification><Message>&b;</Message></Notification>"
    )
    deep, garbage, huge = b"[" * 200 + b"]" * 200, b"\x00garbage", b"{" * 70_000
    event = json.loads(EB_SEEDS[0].read_text())
    one = json.dumps(event).encode()
    bad_shape, bad_event = (json.dumps([event, bad]).encode() for bad in (42, event | {"data": "not an object"}))
    ce, batch = "application/cloudevents+json", "application/cloudevents-batch+json"
    no_token = {k: v for k, v in eb_headers(one, ce).items() if k != "X-Imm-Router-Token"}
    binary_headers, binary_body = binary_request(event)
    del binary_headers["ce-id"]
    return [
        ("forged signature", "mns", publisher.sign(xml, "XML", key=other_key), xml, 403, "signature"),
        ("no signature", "mns", {k: v for k, v in signed.items() if k != "Authorization"}, xml, 403, "signature"),
        ("cert outside prefix", "mns", cert(f"{publisher.url}/other/cert.pem"), xml, 403, "cert_url"),
        ("cert over plain http", "mns", cert(publisher.cert_url.replace("https", "http")), xml, 403, "cert_url"),
        ("cert path escapes", "mns", cert(f"{publisher.prefix}../other/cert.pem"), xml, 403, "cert_url"),
        ("cert redirects out", "mns", cert(f"{publisher.prefix}redirect-outside"), xml, 403, "cert_url"),
        ("cert too big", "mns", cert(f"{publisher.prefix}big.pem"), xml, 403, "certificate"),
        ("tampered body", "mns", signed, tampered, 403, "content_md5"),
        ("tampered body, MD5 redone", "mns", signed | {"Content-MD5": md5(tampered)}, tampered, 403, "signature"),
        ("replayed old Date", "mns", publisher.sign(xml, "XML", date=time.time() - 1200), xml, 403, "date"),
        ("Date in the future", "mns", publisher.sign(xml, "XML", date=time.time() + 1200), xml, 403, "date"),
        ("XML with entities", "mns", publisher.sign(bomb, "XML"), bomb, 400, "xml"),
        ("not XML or JSON", "mns", publisher.sign(garbage, "SIMPLIFIED"), garbage, 400, "decode"),
        ("too deep", "mns", publisher.sign(deep, "SIMPLIFIED"), deep, 400, "decode"),
        ("over max_event_bytes", "mns", publisher.sign(huge, "SIMPLIFIED"), huge, 400, "too_large"),
        ("missing token", "eventbridge", no_token, one, 403, "token"),
        ("wrong token", "eventbridge", eb_headers(one, ce) | {"X-Imm-Router-Token": "guess"}, one, 403, "token"),
        ("wrong HMAC", "eventbridge", eb_headers(one, ce) | {"X-Imm-Router-Signature": "sha256=00"}, one, 403, "hmac"),
        ("HMAC of another body", "eventbridge", eb_headers(b"{}", ce), one, 403, "hmac"),
        ("batch with a non-object", "eventbridge", eb_headers(bad_shape, batch), bad_shape, 400, "event"),
        ("batch with a bad event", "eventbridge", eb_headers(bad_event, batch), bad_event, 400, "decode"),
        ("binary without ce-id", "eventbridge", binary_headers, binary_body, 400, "event"),
        ("not JSON", "eventbridge", eb_headers(b"{nope", ce), b"{nope", 400, "json"),
    ]


async def test_refusals_are_counted_by_reason_and_produce_nothing(
    tansu: TansuBroker,
    unique_topic,
    tmp_path: Path,
    publisher: MnsPublisher,
    ca_pem_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    topic = unique_topic("events")
    path = ingest_config(tmp_path, tansu.bootstrap_servers, topic, publisher, ca_pem_path, max_event_bytes=65_536)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = refusal_cases(publisher, other_key)
    answers = []
    async with router(path) as (service, base), aiohttp.ClientSession() as http:
        for name, endpoint, headers, body, status, reason in cases:
            got, text = await post(http, f"{base}/ingest/{endpoint}", headers, body)
            answers.append(text)
            assert (got, text.count("\n")) == (status, 1), f"{name}: {got} {text!r}"
            refused = service.metrics.ingest_refused.labels(endpoint, reason)._value.get()
            assert refused >= 1, f"{name}: not counted as {reason}"
        huge = b"{" * 70_000

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: bounded as it streams in
            for start in range(0, len(huge), 8192):
                yield huge[start : start + 8192]

        chunked_headers = publisher.sign(huge, "SIMPLIFIED")
        async with http.post(f"{base}/ingest/mns", headers=chunked_headers, data=chunked()) as response:
            assert response.status == 400 and "over the 65536-byte limit" in await response.text()
        async with http.get(f"{base}/metrics") as response:
            metrics = await response.text()
        # One accepted event afterwards: the topic then holds exactly it, so nothing refused got in.
        good = publisher.body(mns_message(MNS_SEEDS[0], "accepted", b64=False), "JSON")
        assert (await post(http, f"{base}/ingest/mns", publisher.sign(good, "JSON"), good))[0] == 204
    records = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    assert [json.loads(r.value)["id"] for r in records] == ["accepted"]
    for _, endpoint, _, _, _, reason in cases:
        assert f'imm_router_ingest_refused_total{{endpoint="{endpoint}",reason="{reason}"}}' in metrics
    assert "ingest mns: 403" in caplog.text  # refusals are logged
    for secret in (TOKEN, HMAC_KEY):
        assert secret not in caplog.text and secret not in metrics and not any(secret in a for a in answers)


async def test_broker_down_answers_503_then_the_retry_is_accepted(
    tansu_factory, moto_s3, unique_topic, tmp_path: Path, publisher: MnsPublisher, ca_pem_path: Path
) -> None:
    broker: TansuBroker = await tansu_factory(storage_engine="s3://tansu/", env=moto_s3.broker_env())
    topic = unique_topic("events")
    path = ingest_config(
        tmp_path, broker.bootstrap_servers, topic, publisher, ca_pem_path, ingest={"produce_timeout_seconds": 1}
    )
    event = json.loads(EB_SEEDS[0].read_text())
    url = "/ingest/eventbridge"
    async with router(path) as (service, base), aiohttp.ClientSession(base_url=base) as http:
        before, during = (json.dumps(event | {"id": i}).encode() for i in ("before", "during"))
        assert (await post(http, url, eb_headers(before, "application/json"), before))[0] == 204
        broker.kill()
        async with http.post(url, headers=eb_headers(during, "application/json"), data=during) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert "Kafka did not confirm within 1s" in await response.text()
        assert service.metrics.ingest_refused.labels("eventbridge", "kafka")._value.get() == 1
        await broker.restart()
        # The sender retries (EventBridge and MNS do on any non-2xx) until the broker takes it.
        deadline = time.monotonic() + 30
        while (status := (await post(http, url, eb_headers(during, "application/json"), during))[0]) != 204:
            assert status == 503 and time.monotonic() < deadline, status
        records = await consume_until(
            broker.bootstrap_servers,
            f"{topic}-eb-alerts",
            lambda records: {"before", "during"} <= set(event_ids(records)),
            "both notifications",
        )
    assert {"before", "during"} <= set(event_ids(records))


async def test_requests_in_flight_are_capped(
    tansu: TansuBroker, unique_topic, tmp_path: Path, publisher: MnsPublisher, ca_pem_path: Path
) -> None:
    topic = unique_topic("events")
    path = ingest_config(tmp_path, tansu.bootstrap_servers, topic, publisher, ca_pem_path, ingest={"max_in_flight": 1})
    body = json.dumps(json.loads(EB_SEEDS[0].read_text())).encode()
    headers = eb_headers(body, "application/json")
    async with router(path) as (service, base), aiohttp.ClientSession() as http:
        port = int(base.rsplit(":", 1)[1])
        # A sender that stalls mid-body holds the only slot.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"POST /ingest/eventbridge HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
        )
        writer.write(body[:10])
        await writer.drain()
        await wait_until(
            lambda: service.metrics.ingest_in_flight._value.get() == 1, what="the stalled request in flight"
        )
        status, text = await post(http, f"{base}/ingest/eventbridge", headers, body)
        assert status == 503 and "in flight" in text
        writer.write(body[10:])
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 204")
        writer.close()
        assert (await post(http, f"{base}/ingest/eventbridge", headers, body))[0] == 204


async def test_sigkill_between_produce_and_answer_acknowledges_nothing_kafka_lacks(
    tansu: TansuBroker, unique_topic, tmp_path: Path, publisher: MnsPublisher, ca_pem_path: Path
) -> None:
    topic = unique_topic("events")
    port = free_port()
    path = ingest_config(tmp_path, tansu.bootstrap_servers, topic, publisher, ca_pem_path, port=port)
    event = json.loads(EB_SEEDS[0].read_text())
    log = tmp_path / "router.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "run", "--config", str(path),
        stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT, cwd=ROOT, env={**os.environ},
    )  # fmt: skip
    acknowledged: list[str] = []
    url = f"http://127.0.0.1:{port}/ingest/eventbridge"

    async def sender(http: aiohttp.ClientSession, n: int) -> None:
        for i in range(100_000):
            body = json.dumps(event | {"id": f"s{n}-{i}"}).encode()
            try:
                status, _ = await post(http, url, eb_headers(body, "application/json"), body)
            except aiohttp.ClientError:
                if proc.returncode is not None:
                    return
                await asyncio.sleep(0.05)  # not listening yet
                continue
            if status == 204:
                acknowledged.append(f"s{n}-{i}")

    try:
        async with aiohttp.ClientSession() as http:
            senders = [asyncio.create_task(sender(http, n)) for n in range(8)]
            await wait_until(lambda: len(acknowledged) >= 300, timeout=60, what=lambda: log.read_text()[-2000:])
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.wait_for(asyncio.gather(*senders), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # Tansu shows a partition's last acknowledged batch only once something else is produced to it.
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap_servers)
    await producer.start()
    try:
        for partition in await producer.partitions_for(topic):
            await producer.send_and_wait(topic, b"{}", partition=partition)
    finally:
        await producer.stop()
    records = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    ids = {json.loads(r.value).get("id") for r in records}
    missing = [i for i in acknowledged if i not in ids]
    assert not missing, f"{len(missing)} acknowledged events not in Kafka: {missing[:5]}"


@pytest.mark.parametrize(
    ("ingest", "top", "expected"),
    [
        ({"mns": {"cert_url_prefixes": ["https://mnstest.oss-cn-hangzhou.aliyuncs.com"]}}, {}, "with a path"),
        ({"mns": {"cert_url_prefixes": ["http://mnstest.example/certs/"]}}, {}, "an https:// URL"),
        ({"mns": {"cert_url_prefixes": []}}, {}, "cert_url_prefixes"),
        ({"eventbridge": {"enabled": True}}, {}, "needs token or hmac_key"),
        ({"mns": {"enabled": True}}, {"http": {"enabled": False}}, "set http.enabled: true"),
        ({"topic": "elsewhere"}, {}, "is not one of kafka.topics"),
        ({"eventbridge": {"tokn": "x"}}, {}, "tokn"),
    ],
)
def test_bad_ingest_config_is_refused_at_load(
    tmp_path: Path, ingest: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        json.dumps(
            {"rules_dir": str(ROOT / "rules"), "templates_dir": str(ROOT / "templates"), "ingest": ingest, **top}
        )
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load(path)


def test_ingest_is_off_by_default_and_its_secrets_stay_hidden(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(json.dumps({"ingest": {"eventbridge": {"enabled": True, "token": TOKEN, "hmac_key": HMAC_KEY}}}))
    settings = load_settings(path)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert TOKEN not in shown and HMAC_KEY not in shown
    assert {TOKEN, HMAC_KEY} <= secret_values(settings)  # so the log redactor masks them
    default = tmp_path / "default.yaml"
    default.write_text("{}")
    assert not load_settings(default).ingest.enabled
