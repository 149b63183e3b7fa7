"""The Kafka channel against Tansu: key, value and headers on the produced record; errors; health."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from router.channels import make_channel
from router.config import KafkaSettings
from router.decode import decode_object
from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.errors import DeliveryError
from tests.test_delivery_support import failed_event, make_engine, notifications, task_id

pytestmark = pytest.mark.timeout(60)


async def consume(bootstrap: str, topic: str, count: int) -> list[object]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        return [await asyncio.wait_for(consumer.getone(), 10) for _ in range(count)]
    finally:
        await consumer.stop()


async def test_produces_key_value_and_headers(
    tmp_path: Path, tansu: TansuBroker, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("alerts")
    # The channel has no bootstrap_servers of its own: it takes the source's.
    engine = make_engine(
        tmp_path,
        {"topic": {"type": "kafka", "topic": topic}},
        kafka={"bootstrap_servers": tansu.bootstrap_servers},
    )
    channel = make_channel("topic", engine.settings.channels["topic"], kafka_defaults=engine.settings.kafka)
    batch = notifications(engine, [failed_event(i) for i in range(3)])
    try:
        assert "1 broker(s)" in await channel.health()
        for notification in batch:
            await channel.send(notification)
    finally:
        await channel.close()
    records = await consume(tansu.bootstrap_servers, topic, 3)
    by_key = {r.key.decode(): r for r in records}  # type: ignore[attr-defined]
    assert set(by_key) == {task_id(i) for i in range(3)}
    record = by_key[task_id(0)]
    assert dict(record.headers) == {"imm-event-id": b"evt-00000", "imm-rule": b"task-failed"}  # type: ignore[attr-defined]
    value = json.loads(record.value)  # type: ignore[attr-defined]
    assert value["alert"] == "task-failed" and value["imm"]["task_id"] == task_id(0)
    assert value == json.loads(batch[0].payload["value"])


async def test_own_bootstrap_servers_and_acks_one(
    tmp_path: Path, tansu: TansuBroker, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("alerts")
    config = {"type": "kafka", "topic": topic, "bootstrap_servers": tansu.bootstrap_servers, "acks": "1"}
    engine = make_engine(tmp_path, {"topic": config}, kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    channel = make_channel("topic", engine.settings.channels["topic"], kafka_defaults=engine.settings.kafka)
    (notification,) = notifications(engine, [failed_event(1)])
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (record,) = await consume(tansu.bootstrap_servers, topic, 1)
    assert record.key == task_id(1).encode()  # type: ignore[attr-defined]


async def test_unreachable_broker_is_retriable(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    engine = make_engine(tmp_path, {"topic": {"type": "kafka", "topic": "t", "bootstrap_servers": bootstrap}})
    channel = make_channel("topic", engine.settings.channels["topic"], kafka_defaults=KafkaSettings())
    (notification,) = notifications(engine, [failed_event(1)])
    try:
        with pytest.raises(DeliveryError) as sending:
            await channel.send(notification)
        with pytest.raises(DeliveryError) as checking:
            await channel.health()
    finally:
        await channel.close()
    assert sending.value.retriable and checking.value.retriable
    assert "KafkaConnectionError" in str(sending.value)


async def test_a_record_over_the_size_limit_is_permanent(
    tmp_path: Path, tansu: TansuBroker, unique_topic: Callable[[str], str]
) -> None:
    config = {"type": "kafka", "topic": unique_topic("alerts"), "bootstrap_servers": tansu.bootstrap_servers}
    engine = make_engine(tmp_path, {"topic": config})
    channel = make_channel("topic", engine.settings.channels["topic"], kafka_defaults=KafkaSettings())
    (notification,) = notifications(engine, [failed_event(1)])
    huge = dataclasses.replace(notification, payload={**notification.payload, "value": "x" * 2_000_000})
    try:
        with pytest.raises(DeliveryError, match="MessageSizeTooLarge") as caught:
            await channel.send(huge)
    finally:
        await channel.close()
    assert not caught.value.retriable


def test_an_alert_stays_small_whatever_the_event_holds(tmp_path: Path) -> None:
    engine = make_engine(
        tmp_path, {"alerts": {"type": "kafka", "topic": "a"}, "hook": {"type": "webhook", "url": "http://h/x"}}
    )
    doc = failed_event(1)
    files = [
        {"URI": f"oss://bucket/dir/{i:06d}-{'x' * 20}.jpg", "Error": f"[E{i}] broken {'y' * 20}"} for i in range(8000)
    ]
    doc["data"] |= {"Files": files, "Message": "m" * 100_000}
    raw = json.dumps(doc).encode()
    assert 900_000 < len(raw) < engine.settings.max_event_bytes
    for notification in notifications(engine, [doc]):
        body = notification.payload.get("value") or json.dumps(notification.payload["body"])
        assert len(body.encode()) < 64_000, (notification.channel, len(body))
        alert = json.loads(body)
        assert alert["counts"] == {"uris": 8000, "failed_files": 8000}
        assert len(alert["imm"]["failed_files"]) == 20 and alert["imm"]["error_message"].endswith("…")


def test_an_alert_over_max_value_bytes_is_a_render_error_naming_the_limit(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, {"alerts": {"type": "kafka", "topic": "a", "max_value_bytes": 500}})
    result = engine.route(decode_object(failed_event(1)))
    (failure,) = result.failures
    assert "over the channel's max_value_bytes (500)" in failure.reason and not result.notifications
