"""The Kafka service against a real broker (Tansu): every wire format end to end, the dead-letter
topic, crash and restart, rebalance, SIGTERM, and backpressure from a stalled channel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import shutil
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router.alerting.topics import TopicSpec, ensure_topics
from router.config import ServiceSettings
from router.embedded import start_router
from router.embedded.broker import TansuBroker
from router.embedded.demo import demo_records
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.smtp import SmtpCapture
from router.embedded.webhook import WebhookCapture
from router.engine import load
from router.service import Service
from router.sources.kafka import PartitionTracker, read_topic
from tests.conftest import EVENTS, ROOT


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Wait on a condition (checked as the loop turns), failing with ``what`` (or what it returns then)
    after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value, headers in records:
            await producer.send_and_wait(
                topic, value=value, key=b"tombstone" if value is None else None, headers=headers
            )
    finally:
        await producer.stop()


async def consume_until(
    bootstrap: str, topic: str, done: Callable[[list[Any]], bool], what: str, timeout: float = 30.0
) -> list[Any]:
    """Read ``topic`` from the start until ``done(records)``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: {what} not there after {timeout}s ({len(records)} records)")
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    return await consume_until(bootstrap, topic, lambda records: len(records) >= count, f"{count} records", timeout)


async def create_topic(bootstrap: str, topic: str, *, partitions: int) -> None:
    await ensure_topics({"bootstrap_servers": bootstrap}, {topic: TopicSpec(partitions, compact=False)}, 1)


async def committed(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offsets on ``topic``, summed (what a restart would resume from)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in partitions]
        return sum(o for o in offsets if o)
    finally:
        await consumer.stop()


def ungrouped_rules(tmp_path: Path) -> Path:
    """The shipped rules with grouping and throttles taken out, so that every notification is checked on
    its own (tests/test_alerting.py tests grouping)."""
    rules = tmp_path / "ungrouped-rules"
    rules.mkdir(exist_ok=True)
    for source in (ROOT / "rules").glob("*.yaml"):
        doc = yaml.safe_load(source.read_text())
        for rule in doc["rules"]:
            rule["notify"] = [{"channel": n["channel"], "template": n["template"]} for n in rule["notify"]]
        (rules / source.name).write_text(yaml.safe_dump(doc, allow_unicode=True))
    return rules


def config(
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    *,
    channels: dict[str, Any] | None = None,
    rules_dir: Path | None = None,
    service: dict[str, Any] | None = None,
) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(
        json.dumps(
            {
                "rules_dir": str(rules_dir or ungrouped_rules(tmp_path)),
                "templates_dir": str(ROOT / "templates"),
                "channels": channels or {},
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topics": [topic],
                    "group_id": f"{topic}-group",
                    "dead_letter_topic": f"{topic}-dlq",
                    # The router's own topics, this test's alone.
                    "notifications_topic": f"{topic}-notifications",
                    "notifications_partitions": 4,
                    "changelog_topic": f"{topic}-changelog",
                    "silences_topic": f"{topic}-silences",
                    "inhibitions_topic": f"{topic}-inhibitions",
                    "session_timeout_ms": 1000,
                    "heartbeat_interval_ms": 200,
                },
                "service": {"commit_interval_seconds": 0.1, "drain_timeout_seconds": 10, **(service or {})},
                "http": {"enabled": False},
            }
        )
    )
    return path


def kafka_only_rules(tmp_path: Path, template: str = "kafka/alert.json.j2", channel: str = "alerts") -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "r.yaml").write_text(
        "rules:\n  - name: any-failure\n    when: \"imm.outcome == 'failed' || imm.moderation.suggestion == 'block'\"\n"
        f"    notify: [{{channel: {channel}, template: {template}}}]\n"
    )
    return rules


def kafka_router(tmp_path: Path, bootstrap: str, topic: str, alerts: str) -> Path:
    """A router config whose one rule sends every failure to the Kafka topic ``alerts``."""
    return config(
        tmp_path,
        bootstrap,
        topic,
        rules_dir=kafka_only_rules(tmp_path),
        channels={"alerts": {"type": "kafka", "topic": alerts}},
    )


def webhook_router(tmp_path: Path, bootstrap: str, topic: str, webhook: WebhookCapture) -> Path:
    """A router config whose one rule sends every failure to ``webhook``."""
    return config(
        tmp_path,
        bootstrap,
        topic,
        rules_dir=kafka_only_rules(tmp_path, "webhook/alert.json.j2", "hook"),
        channels={"hook": {"type": "webhook", "url": webhook.url + "/alerts"}},
    )


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[Service]:
    service = Service(load(path), path)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)


def failed_task(task_id: str) -> bytes:
    return json.dumps(
        {
            "TaskType": "MediaConvert",
            "TaskId": task_id,
            "RequestId": f"req-{task_id}",
            "Status": "Failed",
            "Code": "InvalidArgument",
            "ProjectName": "p",
        }
    ).encode()


def wire_formats() -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    cloudevent = json.loads((EVENTS / "eventbridge" / "Task-AsyncTask.json").read_text())
    mns_content = (EVENTS / "mns" / "MediaConvert-Failed.json").read_text()
    mns = json.dumps(
        {
            "id": "mns-1",
            "source": "acs.imm",
            "type": "imm:Task:MediaConvert",
            "subject": "",
            "time": "1724133063161",
            "content": mns_content,
        }
    ).encode()
    block = (EVENTS / "mns" / "ImageModeration-block.json").read_bytes()
    mns_b64 = base64.b64encode(
        json.dumps(
            {
                "id": "mns-2",
                "source": "acs.imm",
                "type": "imm:Task:ImageModeration",
                "time": "1724133063161",
                "content": block.decode(),
            }
        ).encode()
    )
    binary_headers = [(f"ce_{k}", str(v).encode()) for k, v in cloudevent.items() if k != "data"]
    binary_headers = [(k, v.replace(b"fab****", b"binary")) for k, v in binary_headers]
    return [
        ("45ef4dewdwe1-7c35-447a-bd93-fab****", json.dumps(cloudevent).encode(), []),
        ("45ef4dewdwe1-7c35-447a-bd93-binary", json.dumps(cloudevent["data"]).encode(), binary_headers),
        ("mns-1", mns, []),
        ("mns-2", mns_b64, []),
        ("B39E157F-517B-069D-905D-****", (EVENTS / "mns" / "PointCloudCompress-Failed.json").read_bytes(), []),
    ]


async def test_every_wire_format_end_to_end_to_all_channels(
    tansu: TansuBroker, unique_topic, tmp_path: Path, smtp_plain: SmtpCapture
) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    async with FakeDingTalk({"tok": "sec"}, rate_limit=1000) as dingtalk:
        path = config(
            tmp_path,
            tansu.bootstrap_servers,
            topic,
            channels={
                "alerts-topic": {"type": "kafka", "topic": alerts},
                "oncall-dingtalk": {
                    "type": "dingtalk",
                    "url": dingtalk.webhook_url("tok"),
                    "secret": "sec",
                    "rate_limit": {"per_minute": 1000},
                },
                "ops-email": {
                    "type": "email",
                    "host": "127.0.0.1",
                    "port": smtp_plain.port,
                    "tls": "none",
                    "from": "r@example.com",
                    "to": ["o@example.com"],
                },
            },
        )
        cases = wire_formats()
        async with running(path):
            await produce(tansu.bootstrap_servers, topic, [(value, headers) for _, value, headers in cases])
            records = await consume(tansu.bootstrap_servers, alerts, len(cases))
            await dingtalk.wait_for(len(cases), timeout=20)
            await smtp_plain.wait_for(len(cases) - 1, timeout=20)  # moderation-block mails ops too
    headers = [dict(r.headers) for r in records]
    assert sorted(h["imm-event-id"].decode() for h in headers) == sorted(event_id for event_id, _, _ in cases)
    assert {h["imm-rule"].decode() for h in headers} == {"task-failed", "moderation-block"}
    mail_ids = {m.message["X-IMM-Event-Id"] for m in smtp_plain.messages}
    assert mail_ids == {event_id for event_id, _, _ in cases}
    assert dingtalk.errcodes.get(0) == len(dingtalk.messages) >= len(cases)


POISON = [
    (b"\xff\xfe garbage", "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "imm:Task:X", "source": "acs.imm", "content": "[1]"}', "MNS content is not a JSON object"),
    (b"[" * 3000 + b"]" * 3000, "nested deeper than"),
    (b'{"a": NaN}', "not valid JSON"),
    (None, "empty record"),
    (b"x" * 70_000, "over the 65536-byte limit"),
]


async def test_poison_records_are_dead_lettered_and_consumption_continues(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, tansu.bootstrap_servers, topic, alerts)
    text = path.read_text().replace('"rules_dir"', '"max_event_bytes": 65536, "rules_dir"')
    path.write_text(text)
    records = [(value, [("trace", b"t-%d" % i)]) for i, (value, _) in enumerate(POISON)]
    records.append((failed_task("after-poison"), []))
    async with running(path) as service:
        await produce(tansu.bootstrap_servers, topic, records)
        dead = await consume(tansu.bootstrap_servers, f"{topic}-dlq", len(POISON))
        routed = await consume(tansu.bootstrap_servers, alerts, 1)
        await wait_until(
            lambda: service.committed == len(records),
            what="offsets committed past the poison",
        )
    assert json.loads(routed[0].value)["imm"]["task_id"] == "after-poison"
    by_trace = {dict(r.headers)["trace"]: dict(r.headers) for r in dead}
    for i, (_, problem) in enumerate(POISON):
        headers = by_trace[b"t-%d" % i]
        assert problem in headers["imm-dlq-reason"].decode()
        assert headers["imm-dlq-topic"].decode() == topic
        assert {"imm-dlq-partition", "imm-dlq-offset", "imm-dlq-time"} <= set(headers)
    values = {dict(r.headers)["trace"]: r.value for r in dead}
    assert values[b"t-0"] == POISON[0][0] and values[b"t-6"] is None  # original value kept as is
    assert service.metrics.decode_failures._value.get() == len(POISON)


async def test_an_event_whose_handoff_is_over_the_size_limit_is_dead_lettered_and_routing_goes_on(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    """A hand-off carries the event about three times: a 500 KB event makes one over the producer's 1 MB
    limit. It used to be retried for ever, holding its partition; its source record is dead-lettered."""
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, tansu.bootstrap_servers, topic, alerts)
    big = json.loads(failed_task("too-big"))
    big["UserData"] = "x" * 500_000
    records = [(json.dumps(big).encode(), [("trace", b"big")]), (failed_task("after-big"), [])]
    async with running(path) as service:
        await produce(tansu.bootstrap_servers, topic, records)
        (dead,) = await consume(tansu.bootstrap_servers, f"{topic}-dlq", 1)
        ids = await alert_ids(tansu.bootstrap_servers, alerts, {"after-big"})
        await wait_until(lambda: service.committed == len(records), what="offsets committed past the big event")
    headers = dict(dead.headers)
    assert headers["trace"] == b"big" and dead.value == records[0][0]
    assert headers["imm-dlq-reason"].decode().startswith("handoff too large to produce: ")
    assert "MessageSizeTooLargeError" in headers["imm-dlq-reason"].decode()
    assert ids == ["after-big"]
    assert service.metrics.handoffs._value.get() == 1


async def test_a_record_too_large_to_dead_letter_whole_goes_without_its_value_and_routing_goes_on(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    """An oversized record is dead-lettered; with the reason added it no longer fits the producer's 1 MB
    limit. It used to raise out of the routing batch and hold its partition's commits for good."""
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, tansu.bootstrap_servers, topic, alerts)
    path.write_text(path.read_text().replace('"rules_dir"', '"max_event_bytes": 65536, "rules_dir"'))
    huge = b'{"UserData": "' + b"x" * 1_048_500 + b'"}'
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap_servers, max_request_size=2_000_000)
    await producer.start()
    try:
        await producer.send_and_wait(topic, huge, headers=[("trace", b"huge")])
        await producer.send_and_wait(topic, failed_task("after-huge"))
    finally:
        await producer.stop()
    async with running(path) as service:
        (dead,) = await consume(tansu.bootstrap_servers, f"{topic}-dlq", 1)
        assert await alert_ids(tansu.bootstrap_servers, alerts, {"after-huge"}) == ["after-huge"]
        await wait_until(lambda: service.committed == 2, what="offsets committed past the huge record")
    headers = dict(dead.headers)
    assert dead.value == b"" and headers["trace"] == b"huge"
    assert "over the 65536-byte limit" in headers["imm-dlq-reason"].decode()
    dropped = headers["imm-dlq-value-dropped"].decode()
    assert dropped.startswith(f"{len(huge)} bytes, over the producer's size limit")
    assert f"the original is at {topic}/{headers['imm-dlq-partition'].decode()}@0 until" in dropped


async def test_exhausted_delivery_is_dead_lettered_with_rule_and_channel(
    tansu: TansuBroker, unique_topic, tmp_path: Path, webhook: WebhookCapture
) -> None:
    topic = unique_topic("events")
    webhook.set_statuses([400])
    path = webhook_router(tmp_path, tansu.bootstrap_servers, topic, webhook)
    async with running(path) as service:
        await produce(tansu.bootstrap_servers, topic, [(failed_task("t-400"), [("k", b"v")])])
        dead = await consume(tansu.bootstrap_servers, f"{topic}-dlq", 1)
        registry = service.metrics.registry
        await wait_until(
            lambda: bool(registry.get_sample_value("imm_router_dead_letter_records_total", {"reason": "delivery"}))
        )
    # Counted once per dead-lettered notification (issue 11, defect 11: it was counted twice).
    assert registry.get_sample_value("imm_router_notifications_dead_lettered_total", {"channel": "hook"}) == 1
    headers = dict(dead[0].headers)
    assert headers["imm-dlq-rule"] == b"any-failure" and headers["imm-dlq-channel"] == b"hook"
    assert headers["imm-dlq-reason"].startswith(b"delivery: ") and b"400" in headers["imm-dlq-reason"]
    assert headers["k"] == b"v" and dead[0].value == failed_task("t-400")


async def test_a_stalled_channel_pauses_fetching_instead_of_growing_memory(
    tansu: TansuBroker, unique_topic, tmp_path: Path, webhook: WebhookCapture
) -> None:
    topic = unique_topic("events")
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=kafka_only_rules(tmp_path, "webhook/alert.json.j2", "hook"),
        channels={"hook": {"type": "webhook", "url": webhook.url, "concurrency": 2, "retry": {"budget_seconds": 120}}},
        # The notify stage holds what waits for the channel: its bound is the one that must hold.
        service={"max_in_flight": 40, "max_in_flight_per_partition": 15, "max_pending_notifications": 40},
    )
    webhook.hold()
    n = 300
    async with running(path) as service:
        await produce(tansu.bootstrap_servers, topic, [(failed_task(f"s-{i}"), []) for i in range(n)])
        await wait_until(lambda: service.metrics.paused._value.get() == 1, what="fetching paused")
        assert service.peak_in_flight <= 40
        assert len(webhook.requests) <= 2  # the channel's concurrency limit holds
        webhook.release()
        await webhook.wait_for(n, timeout=60)
        await wait_until(
            lambda: service.committed == n,
            timeout=30,
            what="all offsets committed",
        )
    assert service.peak_in_flight <= 40
    assert sorted(r.json()["imm"]["task_id"] for r in webhook.requests.items) == sorted(f"s-{i}" for i in range(n))


async def test_a_stage_at_its_bound_takes_the_next_batch_as_soon_as_one_settles(
    tansu: TansuBroker, unique_topic
) -> None:
    """aiokafka's getmany wakes only for fetched records, and a paused partition is not fetched: a stage at
    its bound must not sit out a long poll once a batch settles (it waited up to 200 ms per pause, which
    left routing idle for a third of a backlog's drain)."""
    from router.metrics import Metrics
    from router.sources.kafka import Bounds, ConsumerStage

    class Consumer(AIOKafkaConsumer):  # type: ignore[misc]
        polled_while_paused = asyncio.Event()

        async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None):
            if self.paused():
                self.polled_while_paused.set()
            return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    topic = unique_topic("bound")
    await ensure_topics({"bootstrap_servers": tansu.bootstrap_servers}, {topic: TopicSpec(1, compact=False)}, 1)
    await produce(tansu.bootstrap_servers, topic, [(failed_task(f"b-{i}"), []) for i in range(20)])
    release, handed = asyncio.Event(), []

    async def route(tp: TopicPartition, records: list[Any]) -> None:
        handed.append((time.monotonic(), len(records)))
        if len(handed) == 1:
            await release.wait()

    consumer = Consumer(
        bootstrap_servers=tansu.bootstrap_servers,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=25,
    )
    stage = ConsumerStage("route", consumer, Bounds(5, 5, 1.0, 1000, 1.0), Metrics(), batch_handler=route)
    consumer.subscribe([topic], listener=stage.listener())
    await consumer.start()
    stopping = asyncio.Event()
    running_stage = asyncio.create_task(stage.run(stopping))
    try:
        await asyncio.wait_for(consumer.polled_while_paused.wait(), 20)
        assert [size for _, size in handed] == [5]  # the first 5 held: the stage is at its bound
        released = time.monotonic()
        release.set()
        await wait_until(lambda: len(handed) >= 2, what="the next batch")
        waited = handed[1][0] - released
        assert waited < 0.15, f"the next batch came {waited:.3f}s after room was made"
    finally:
        stopping.set()
        await running_stage
        await asyncio.gather(*stage.tasks)
        await consumer.stop()


def test_a_partitions_default_bound_holds_a_whole_fetch_of_typical_imm_events() -> None:
    # aiokafka drops what it has fetched for a partition paused at its bound: below one fetch, records are
    # fetched again and again and routing waits on the broker (at 500 a backlog drained at 0.57x of 2,000).
    fetch_bytes = inspect.signature(AIOKafkaConsumer).parameters["max_partition_fetch_bytes"].default
    sizes = [len(value) + sum(len(k) + len(v) for k, v in headers) for _, value, headers in demo_records()]
    bound = ServiceSettings().max_in_flight_per_partition
    assert bound * statistics.median(sizes) >= fetch_bytes
    assert ServiceSettings().max_in_flight >= 2 * bound  # two partitions' fetches at least


# --- router processes -----------------------------------------------------------------------------


async def alert_ids(bootstrap: str, topic: str, expected: set[str], timeout: float = 60.0) -> list[str]:
    """Task ids of the alerts on ``topic``, read until every expected id arrived."""

    def ids(records: list[Any]) -> list[str]:
        return [json.loads(r.value)["imm"]["task_id"] for r in records]

    what = f"alerts {sorted(expected)[:5]}…"
    return ids(await consume_until(bootstrap, topic, lambda records: expected <= set(ids(records)), what, timeout))


async def test_sigkill_mid_stream_and_restart_loses_nothing(tansu: TansuBroker, unique_topic, tmp_path: Path) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, tansu.bootstrap_servers, topic, alerts)
    expected = {f"k-{i}" for i in range(400)}
    router = await start_router(path, tmp_path / "router.log")
    try:
        await produce(tansu.bootstrap_servers, topic, [(failed_task(t), []) for t in sorted(expected)])
        await alert_ids(tansu.bootstrap_servers, alerts, {"k-0"}, timeout=30)  # mid-stream
        router.kill()
        await router.wait()
        router = await start_router(path, tmp_path / "router.log")
        ids = await alert_ids(tansu.bootstrap_servers, alerts, expected)
    finally:
        router.send_signal(signal.SIGTERM)
        await asyncio.wait_for(router.wait(), 30)
    assert expected <= set(ids)


async def test_two_routers_in_one_group_lose_nothing_and_sigterm_commits(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    await create_topic(tansu.bootstrap_servers, topic, partitions=4)
    path = kafka_router(tmp_path, tansu.bootstrap_servers, topic, alerts)
    first = [f"a-{i}" for i in range(150)]
    second = [f"b-{i}" for i in range(150)]
    one = await start_router(path, tmp_path / "one.log")
    two = None
    try:
        await produce(tansu.bootstrap_servers, topic, [(failed_task(t), []) for t in first])
        await alert_ids(tansu.bootstrap_servers, alerts, {"a-0"}, timeout=30)
        two = await start_router(path, tmp_path / "two.log")  # joins the group: a rebalance mid-stream
        await wait_until(
            lambda: "assigned" in (tmp_path / "two.log").read_text(),
            timeout=30,
            what="the second router to get partitions",
        )
        await produce(tansu.bootstrap_servers, topic, [(failed_task(t), []) for t in second])
        ids = await alert_ids(tansu.bootstrap_servers, alerts, set(first) | set(second))
    finally:
        for router in (one, two):
            if router is not None:
                router.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(r.wait(), 30) for r in (one, two) if r is not None]
    assert set(first) | set(second) <= set(ids)
    assert codes == [0, 0], (tmp_path / "one.log").read_text()[-2000:]
    assert await committed(tansu.bootstrap_servers, f"{topic}-group", topic) == len(first) + len(second)


async def test_broker_unreachable_at_start_then_available(tansu_factory, unique_topic, tmp_path: Path) -> None:
    from router.embedded import free_port

    port = free_port()
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, f"127.0.0.1:{port}", topic, alerts)
    async with running(path):
        broker: TansuBroker = await tansu_factory(port=port)  # the router keeps retrying until this
        await produce(broker.bootstrap_servers, topic, [(failed_task("late"), [])])
        assert await alert_ids(broker.bootstrap_servers, alerts, {"late"}) == ["late"]


async def test_broker_restart_mid_run_resumes_by_itself(tansu_factory, moto_s3, unique_topic, tmp_path: Path) -> None:
    broker: TansuBroker = await tansu_factory(storage_engine="s3://tansu/", env=moto_s3.broker_env())
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, broker.bootstrap_servers, topic, alerts)
    async with running(path):
        await produce(broker.bootstrap_servers, topic, [(failed_task("before"), [])])
        await alert_ids(broker.bootstrap_servers, alerts, {"before"})
        await broker.restart()
        await produce(broker.bootstrap_servers, topic, [(failed_task("after"), [])])
        ids = await alert_ids(broker.bootstrap_servers, alerts, {"before", "after"})
    assert {"before", "after"} <= set(ids)


async def test_stopping_while_the_broker_is_down_ends_cleanly(tansu_factory, unique_topic, tmp_path: Path) -> None:
    """SIGTERM (stop) while Kafka is gone: the drain and client shutdown are bounded and run() returns; a
    client's own CancelledError from a stop that cannot reach the broker must not escape it."""
    broker: TansuBroker = await tansu_factory()
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = kafka_router(tmp_path, broker.bootstrap_servers, topic, alerts)
    service = Service(load(path), path)
    task = asyncio.create_task(service.run())
    try:
        await produce(broker.bootstrap_servers, topic, [(failed_task("before"), [])])
        await alert_ids(broker.bootstrap_servers, alerts, {"before"})
        await broker.stop()
    finally:
        service.stop()
        await asyncio.wait_for(task, 90)
    assert task.done() and not task.cancelled() and task.exception() is None


async def test_read_topic_returns_every_record_of_a_last_batch_of_many(tansu: TansuBroker, unique_topic) -> None:
    """Tansu reports a partition's end as one past the first record of its last batch (until the next
    produce): reading up to that end must still return the whole batch."""
    topic = unique_topic("batch")
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap_servers, linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send(topic, f"v{i}".encode(), partition=0) for i in range(10)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    records = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    assert [r.value for r in records] == [f"v{i}".encode() for i in range(10)]


def test_partition_tracker_commits_only_below_the_lowest_unsettled_offset() -> None:
    tracker = PartitionTracker()
    for offset in range(10, 15):
        tracker.start(offset)
    tracker.settle(12)
    tracker.settle(11)
    assert tracker.next_commit is None  # 10 still in flight
    tracker.settle(10)
    assert tracker.next_commit == 13 and tracker.in_flight == 2
    tracker.settle(14)
    tracker.settle(13)
    assert tracker.next_commit == 15 and tracker.in_flight == 0


async def test_handoffs_to_a_channel_this_replica_owns_are_taken_at_once_and_committed(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    """One replica owns every channel: its handoffs go straight to its notify stage (no read back), each
    alert is delivered once, and the notify group commits past them, so a restart sends nothing again.
    Duplicate suppression is off: a handoff handled twice would show as a second alert."""
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=kafka_only_rules(tmp_path),
        channels={"alerts": {"type": "kafka", "topic": alerts}},
        service={"dedup_ttl_seconds": 0},
    )
    count = 200
    async with running(path) as service:
        await wait_until(lambda: len(service.owned_partitions) == 4, what="the notify stage owning its partitions")
        for batch in range(4):  # in several fetches, so that most handoffs find the consumer caught up
            await produce(tansu.bootstrap_servers, topic, [(failed_task(f"t-{batch}-{i}"), []) for i in range(50)])
            done = 50 * (batch + 1)
            await wait_until(lambda done=done: service.metrics.handoffs._value.get() == done and service.idle)
        taken = service.metrics.handoffs_taken._value.get()
        notify_group = f"{topic}-group-notify"
        await wait_until(
            lambda: service.notify is not None and service.notify.committed == count, what="notify commits"
        )
    delivered = await consume(tansu.bootstrap_servers, alerts, count)
    ids = [json.loads(r.value)["imm"]["task_id"] for r in delivered]
    assert len(ids) == len(set(ids)) == count
    # Not all: the first of each partition (where its consumer stands is known once it has fetched), and any
    # a fetch brought back before the broker acknowledged writing it (then it is handled as fetched).
    assert count // 2 <= taken < count
    assert await committed(tansu.bootstrap_servers, notify_group, f"{topic}-notifications") == count
    async with running(path) as again:  # a handoff read again would come before this one's alert
        await produce(tansu.bootstrap_servers, topic, [(failed_task("after-restart"), [])])
        await consume_until(
            tansu.bootstrap_servers, alerts, lambda rs: b"after-restart" in rs[-1].value if rs else False, "the last"
        )
        await wait_until(lambda: again.idle, what="the restarted router settled")
    assert len(await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, alerts)) == count + 1


async def test_a_record_taken_before_it_is_fetched_is_handled_once_and_commits_in_order() -> None:
    """ConsumerStage.take: the routing stage gives the notify stage a handoff it has just written, before
    the consumer fetches it back. Taken only when every record before it has come; skipped when fetched;
    the commit point still never passes an unsettled record."""
    from router.metrics import Metrics
    from router.sources.kafka import Bounds, ConsumerStage

    class Record:
        def __init__(self, offset: int) -> None:
            self.offset = offset

    handled: list[int] = []
    settles: dict[int, Callable[[], None]] = {}

    def handle(offset: int) -> Callable[[Callable[[], None]], Any]:
        async def go(settle: Callable[[], None]) -> None:
            handled.append(offset)
            settles[offset] = settle

        return go

    async def fetched(tp: TopicPartition, record: Any, settle: Callable[[], None]) -> None:
        raise AssertionError("not called here: the test plays the consumer loop's part with tracker.arrived")

    stage = ConsumerStage("notify", None, Bounds(4, 10, 5.0, 100, 1.0), Metrics(), fetched)  # type: ignore[arg-type]
    tp = TopicPartition("notifications", 0)
    assert not stage.take(tp, 0, handle(0))  # nothing fetched yet: where the consumer stands is unknown
    tracker = stage.trackers.setdefault(tp, PartitionTracker())
    assert [r.offset for r in tracker.arrived([Record(0), Record(1)])] == [0, 1]
    assert not stage.take(tp, 3, handle(3))  # offset 2 has not come: it must be handled first
    assert stage.take(tp, 2, handle(2)) and not stage.take(tp, 2, handle(2))
    assert not stage.take(tp, 4, handle(4))  # 4 is not next (3 is)
    assert stage.take(tp, 3, handle(3))
    assert not stage.take(tp, 4, handle(4))  # 0-3 in flight: max_in_flight (4) reached, 4 waits to be fetched
    await asyncio.gather(*stage.tasks)
    assert handled == [2, 3]
    fresh = tracker.arrived([Record(2), Record(3), Record(4)])  # the fetch brings the taken ones too
    assert [r.offset for r in fresh] == [4] and not tracker.taken
    for offset in (1, 0):
        tracker.settle(offset)
    assert tracker.next_commit == 2  # 2 is taken but not settled: the commit stops below it
    settles[3]()
    assert tracker.next_commit == 2
    settles[2]()
    tracker.settle(4)
    assert tracker.next_commit == 5 and tracker.in_flight == 0 and not tracker.settled


async def test_a_commit_still_in_flight_when_its_partition_is_revoked_ends_cleanly() -> None:
    """The broker-outage case from CI: the shutdown commit waits on the broker, a rebalance revokes the
    partition meanwhile, and the commit then returns for a partition the stage no longer tracks."""
    from router.metrics import Metrics
    from router.sources.kafka import Bounds, ConsumerStage

    class SlowCommits:  # stands in for aiokafka's consumer: the first commit is held until released
        def __init__(self) -> None:
            self.commits: list[dict[TopicPartition, int]] = []
            self.started = asyncio.Event()
            self.release = asyncio.Event()

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            self.commits.append(dict(offsets))
            self.started.set()
            if len(self.commits) == 1:
                await self.release.wait()

        def highwater(self, tp: TopicPartition) -> None:
            return None

    async def handler(tp: TopicPartition, record: Any, settle: Callable[[], None]) -> None:
        settle()

    consumer = SlowCommits()
    stage = ConsumerStage("test", consumer, Bounds(10, 10, 5.0, 100, 1.0), Metrics(), handler)  # type: ignore[arg-type]
    tp = TopicPartition("events", 0)
    tracker = stage.trackers.setdefault(tp, PartitionTracker())
    tracker.start(7)
    tracker.settle(7)
    shutdown = asyncio.create_task(stage.commit(force=True))
    await consumer.started.wait()
    await stage.revoked({tp})
    assert tp not in stage.trackers
    consumer.release.set()
    await shutdown
    assert consumer.commits == [{tp: 8}, {tp: 8}] and tracker.committed == 8


async def test_replay_hands_a_dead_lettered_alert_to_the_running_router(
    tansu: TansuBroker, unique_topic, tmp_path: Path, webhook: WebhookCapture
) -> None:
    topic = unique_topic("events")
    webhook.set_statuses([400])  # the first attempt is refused for good: dead-lettered
    path = webhook_router(tmp_path, tansu.bootstrap_servers, topic, webhook)
    async with running(path):
        await produce(tansu.bootstrap_servers, topic, [(failed_task("t-replay"), [])])
        await consume(tansu.bootstrap_servers, f"{topic}-dlq", 1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "replay", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "handed off:" in out.decode() and "any-failure → hook" in out.decode()
        delivered = await webhook.wait_for(2, timeout=20)  # the refused attempt, then the replayed one
    assert delivered[-1].json()["imm"]["task_id"] == "t-replay"


async def test_a_slow_template_does_not_stall_the_event_loop(tansu: TansuBroker, unique_topic, tmp_path: Path) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    # A few seconds of looping: within its budget, but seconds the event loop must not lose.
    slow = "{% for a in range(5000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}{{ imm.task_id }}"
    (templates / "kafka" / "slow.j2").write_text("{% block value %}" + slow + "{% endblock %}")
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=kafka_only_rules(tmp_path, "kafka/slow.j2"),
        channels={"alerts": {"type": "kafka", "topic": alerts}},
    )
    path.write_text(
        json.dumps(json.loads(path.read_text()) | {"templates_dir": str(templates), "render_timeout_seconds": 30})
    )
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    async with running(path) as service:
        await wait_until(lambda: bool(service.owned_partitions), what="the notify stage's partitions")
        ticking = asyncio.create_task(ticker())
        await produce(tansu.bootstrap_servers, topic, [(failed_task("slow-1"), [])])
        (alert,) = await consume(tansu.bootstrap_servers, alerts, 1)
        ticking.cancel()
    assert alert.value == b"slow-1"
    assert max(gaps) < 0.3, f"the event loop stalled for {max(gaps):.2f}s"
