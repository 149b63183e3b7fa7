"""Delivered messages per minute for each channel type against the local servers, through the whole
delivery pipeline (Delivery.deliver: dedup, breaker, limiter bookkeeping, timeout, metrics), beside a
baseline in the same run: the bare client library sending the same payloads with the same number of
concurrent senders (the channel's default concurrency, 4), reported as a ratio. Both sides warm up
first (connections, TLS, AUTH) and then alternate, so neither profits from going second.

- email: aiosmtpd with STARTTLS + AUTH; baseline: aiosmtplib, one connection per sender, reused.
- dingtalk: the fake robot API with its limit lifted, signed requests; baseline: aiohttp POSTs, signed.
- kafka: Tansu; baseline: aiokafka send_and_wait with the same producer settings.
- webhook: WebhookCapture; baseline: aiohttp POSTs.

Run: python bench/channels_bench.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import orjson
import trustme
from aiokafka import AIOKafkaProducer
from yarl import URL

from router.channels.dingtalk import sign
from router.decode import decode_object
from router.delivery.pipeline import Delivery
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.smtp import SmtpCapture
from router.embedded.webhook import WebhookCapture
from router.engine import Engine, load
from router.metrics import Metrics
from router.notification import Notification

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {
    "dingtalk": "dingtalk/task-failed.md.j2",
    "email": "email/task-failed.j2",
    "kafka": "kafka/alert.json.j2",
    "webhook": "webhook/alert.json.j2",
}
CONCURRENCY = 4  # ChannelConfigBase.concurrency's default
USER, PASSWORD, TOKEN, SECRET = "bench@example.test", "bench-pw", "bench-token", "bench-secret"


def engine_for(workdir: Path, channels: dict[str, dict[str, Any]], kafka: str) -> Engine:
    (workdir / "rules").mkdir(parents=True, exist_ok=True)
    notify = [{"channel": name, "template": TEMPLATES[config["type"]]} for name, config in channels.items()]
    rule = {"name": "task-failed", "events": ["imm:Task:*"], "when": "imm.outcome == 'failed'", "notify": notify}
    (workdir / "rules" / "r.yaml").write_text(json.dumps({"rules": [rule]}))
    doc = {
        "rules_dir": "rules",
        "templates_dir": str(ROOT / "templates"),
        "channels": channels,
        "kafka": {"bootstrap_servers": kafka},
        "service": {"dedup_ttl_seconds": 0},
    }
    (workdir / "router.yaml").write_text(json.dumps(doc))
    return load(workdir / "router.yaml")


def notifications_for(engine: Engine, channel: str, count: int) -> list[Notification]:
    found = []
    for i in range(count):
        event = {
            "specversion": "1.0",
            "id": f"bench-{i}",
            "source": "acs.imm",
            "type": "imm:Task:MediaConvert",
            "data": {"ProjectName": "bench", "TaskId": f"task-{i}", "Status": "Failed", "Code": "InvalidParameter"},
        }
        found += [n for n in engine.route(decode_object(event)).notifications if n.channel == channel]
    return found


Sender = Callable[[list[Notification]], Awaitable[None]]


async def in_parallel(items: Sequence[Any], worker: Callable[[Any], Awaitable[None]]) -> None:
    """``worker`` over ``items`` by CONCURRENCY senders, like the channel's concurrency limit."""
    queue = list(reversed(items))

    async def sender() -> None:
        while queue:
            await worker(queue.pop())

    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))


def at_once(delivery: Delivery) -> Sender:
    """All notifications handed to Delivery at once, as the service does; it keeps 4 sends in flight."""

    async def send_all(batch: list[Notification]) -> None:
        outcomes = await asyncio.gather(*(delivery.deliver(n) for n in batch))
        assert set(outcomes) == {"sent"}, outcomes

    return send_all


def by_senders(delivery: Delivery) -> Sender:
    """Delivery driven like the baseline: CONCURRENCY callers, one notification at a time each."""

    async def deliver(n: Notification) -> None:
        assert await delivery.deliver(n) == "sent"

    return bare(deliver)


def bare(send: Callable[[Notification], Awaitable[None]]) -> Sender:
    async def send_all(batch: list[Notification]) -> None:
        await in_parallel(batch, send)

    return send_all


@contextlib.asynccontextmanager
async def email(workdir: Path) -> AsyncIterator[tuple[Engine, str, Sender]]:
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async with SmtpCapture(tls_context=server_ctx, auth=(USER, PASSWORD)) as server:
        config = {
            "type": "email",
            "host": "127.0.0.1",
            "port": server.port,
            "ca_file": str(ca_file),
            "username": USER,
            "password": PASSWORD,
            "from": "router@example.test",
            "to": ["oncall@example.test"],
        }
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        options = {"start_tls": True, "tls_context": client_ctx, "username": USER, "password": PASSWORD}
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, **options) for _ in range(CONCURRENCY)]
        for client in clients:
            await client.connect()

        async def send(n: Notification) -> None:
            p = n.payload
            message = EmailMessage()
            message["From"], message["To"], message["Subject"] = p["from"], ", ".join(p["to"]), p["subject"]
            message.set_content(p["text"])
            message.add_alternative(p["html"], subtype="html")
            client = clients.pop()
            await client.send_message(message)
            clients.append(client)

        yield engine_for(workdir / "email", {"mail": config}, "127.0.0.1:9"), "mail", bare(send)
        for client in clients:
            await client.quit()


@contextlib.asynccontextmanager
async def dingtalk(workdir: Path) -> AsyncIterator[tuple[Engine, str, Sender]]:
    async with FakeDingTalk({TOKEN: SECRET}, rate_limit=10**9) as server, aiohttp.ClientSession() as session:
        url = URL(server.webhook_url(TOKEN))
        config = {"type": "dingtalk", "url": str(url), "secret": SECRET, "rate_limit": {"per_minute": 10**9}}

        async def send(n: Notification) -> None:
            timestamp = int(time.time() * 1000)
            signed = url.extend_query(timestamp=str(timestamp), sign=sign(SECRET, timestamp))
            async with session.post(signed, data=orjson.dumps(n.payload)) as response:
                assert (await response.json())["errcode"] == 0

        yield engine_for(workdir / "dingtalk", {"ding": config}, "127.0.0.1:9"), "ding", bare(send)


@contextlib.asynccontextmanager
async def kafka(workdir: Path) -> AsyncIterator[tuple[Engine, str, Sender]]:
    async with TansuBroker(log_path=workdir / "tansu.log") as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", linger_ms=5)
        await producer.start()

        async def send(n: Notification) -> None:
            p = n.payload
            headers = [(k, v.encode()) for k, v in p["headers"].items()]
            await producer.send_and_wait(p["topic"], p["value"].encode(), key=p["key"].encode(), headers=headers)

        try:
            config = {"type": "kafka", "topic": "bench"}
            yield engine_for(workdir / "kafka", {"topic": config}, broker.bootstrap_servers), "topic", bare(send)
        finally:
            await producer.stop()


@contextlib.asynccontextmanager
async def webhook(workdir: Path) -> AsyncIterator[tuple[Engine, str, Sender]]:
    async with WebhookCapture() as server, aiohttp.ClientSession() as session:

        async def send(n: Notification) -> None:
            body = orjson.dumps(n.payload["body"])
            async with session.post(f"{server.url}/h", data=body, headers=n.payload["headers"]) as response:
                assert response.status == 200

        config = {"type": "webhook", "url": f"{server.url}/h"}
        yield engine_for(workdir / "webhook", {"hook": config}, "127.0.0.1:9"), "hook", bare(send)


async def per_minute(sender: Sender, batch: list[Notification]) -> float:
    start = time.perf_counter()
    await sender(batch)
    return len(batch) / (time.perf_counter() - start) * 60


async def main(count: int, rounds: int) -> None:
    benches = {"email (STARTTLS+AUTH)": email, "dingtalk (no limit)": dingtalk, "kafka": kafka, "webhook": webhook}
    print(f"{count} messages a round, median of {rounds} alternating rounds after a warm-up; messages per minute")
    print("(router: Delivery.deliver from 4 callers like the baseline, and with every notification at once):")
    print(f"{'channel':<24}{'bare library':>14}{'router':>10}{'ratio':>7}{'at once':>10}{'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, bench in benches.items():
            async with bench(Path(tmp)) as (engine, channel, baseline):
                batch = notifications_for(engine, channel, count)
                delivery = Delivery(engine, {}, Metrics())
                senders = [baseline, by_senders(delivery), at_once(delivery)]
                try:
                    for sender in senders:  # connections, TLS, AUTH, producer start: outside the clock
                        await sender(batch[:50])
                    results: list[list[float]] = [[] for _ in senders]
                    for _ in range(rounds):
                        for sender, found in zip(senders, results, strict=True):
                            found.append(await per_minute(sender, batch))
                finally:
                    await delivery.close(5)
            bare_rate, router_rate, at_once_rate = (statistics.median(r) for r in results)
            print(
                f"{name:<24}{bare_rate:>14,.0f}{router_rate:>10,.0f}{router_rate / bare_rate:>7.2f}"
                f"{at_once_rate:>10,.0f}{at_once_rate / bare_rate:>7.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rounds))
