"""``imm-router demo``: the whole product on one machine with nothing to configure.

Starts a Kafka-compatible broker (Tansu), an SMTP server and a DingTalk-like robot API on loopback
(both write what they receive to ./outbox/), runs the router service with the shipped rules and
templates, produces every IMM example event in every wire format plus one poison record, and prints
what was routed where. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from router.decode import decode
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.smtp import SmtpCapture
from router.engine import load
from router.errors import DecodeError
from router.service import Service
from router.sources.kafka import read_topic

ROOT = Path(__file__).resolve().parents[2]
TOKEN, SECRET = "demo-token", "demo-secret"
EVENTS_TOPIC, ALERTS_TOPIC, DLQ_TOPIC = "imm-events", "imm-alerts", "imm-router-dlq"


def demo_config(directory: Path, broker: str, smtp_port: int, dingtalk_url: str) -> Path:
    config = {
        "rules_dir": str(ROOT / "rules"),
        "templates_dir": str(ROOT / "templates"),
        "timezone": "Asia/Shanghai",
        "channels": {
            "oncall-dingtalk": {"type": "dingtalk", "url": dingtalk_url, "secret": SECRET},
            "ops-email": {
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp_port,
                "tls": "none",
                "from": "IMM Router <alerts@demo.local>",
                "to": ["oncall@demo.local"],
            },
            "alerts-topic": {"type": "kafka", "topic": ALERTS_TOPIC},
        },
        "kafka": {
            "bootstrap_servers": broker,
            "topics": [EVENTS_TOPIC],
            "group_id": "imm-router-demo",
            "dead_letter_topic": DLQ_TOPIC,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "service": {"commit_interval_seconds": 0.2},
        "http": {"enabled": False},
    }
    path = directory / "router.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def demo_records() -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """(label, value, headers) for every example, in the wire formats it can arrive in."""
    records: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
    events = ROOT / "tests" / "events"
    for i, path in enumerate(sorted((events / "eventbridge").glob("*.json"))):
        event = json.loads(path.read_text())
        event["id"] = f"{event['id']}-{i}"  # the document reuses one id for every example
        if i % 3 == 1:  # CloudEvents binary mode: attributes in ce_ headers, data as the value
            headers = [(f"ce_{k}", str(v).encode()) for k, v in event.items() if k != "data"]
            records.append((f"{path.stem} (binary)", json.dumps(event["data"]).encode(), headers))
        else:
            records.append((f"{path.stem} (cloudevent)", json.dumps(event, ensure_ascii=False).encode(), []))
    for i, path in enumerate(sorted((events / "mns").glob("*.json"))):
        content = json.loads(path.read_text())
        if path.name.startswith("envelope-"):
            body = json.dumps(content, ensure_ascii=False).encode()
        else:
            task = content.get("TaskType", "FileMeta")
            body = json.dumps(
                {
                    "id": f"mns-{i}",
                    "source": "acs.imm",
                    "type": f"imm:Task:{task}",
                    "subject": "",
                    "time": "1724133063161",
                    "content": json.dumps(content, ensure_ascii=False),
                },
                ensure_ascii=False,
            ).encode()
        records.append(
            (f"{path.stem} (mns, base64)", base64.b64encode(body), []) if i % 2 else (f"{path.stem} (mns)", body, [])
        )
    records.append(("poison record", b"\xff\xfe not an event", []))
    return records


STORM_SIZE = 300


def storm_records() -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """A storm: 300 MediaConvert tasks failing in two projects with two error codes. The shipped rules
    group them by project, task type and error code: four DingTalk messages and four emails list them all."""
    records: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
    for i in range(STORM_SIZE):
        payload = {
            "TaskType": "MediaConvert",
            "TaskId": f"storm-{i:03d}",
            "RequestId": f"storm-req-{i:03d}",
            "ProjectName": ("media-prod", "media-staging")[i % 2],
            "Status": "Failed",
            "Code": ("InvalidArgument", "ResourceNotFound")[i // 2 % 2],
            "Message": "the source object cannot be read",
        }
        records.append((f"storm {i}", json.dumps(payload).encode(), []))
    return records


async def produce(bootstrap: str, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for label, value, headers in records:
            await producer.send_and_wait(EVENTS_TOPIC, value=value, key=label.encode(), headers=headers)
    finally:
        await producer.stop()


async def run_demo(outbox: Path, *, exit_after: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for sub in ("email", "dingtalk"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    print("starting an embedded broker (Tansu), an SMTP server and a DingTalk-like robot API on 127.0.0.1 …")
    async with (
        TansuBroker() as broker,
        SmtpCapture(outbox=outbox / "email") as smtp,
        FakeDingTalk({TOKEN: SECRET}, outbox=outbox / "dingtalk") as dingtalk,
    ):
        with tempfile.TemporaryDirectory() as tmp:
            config = demo_config(Path(tmp), broker.bootstrap_servers, smtp.port, dingtalk.webhook_url(TOKEN))
            engine = load(config)
            service = Service(engine, config)
            running = asyncio.create_task(service.run())
            records = demo_records() + storm_records()
            expected = Counter[str]()
            for _label, value, headers in records:
                with contextlib.suppress(DecodeError):
                    for n in engine.route(decode(value, headers)).notifications:
                        expected[n.channel] += 1
            await produce(broker.bootstrap_servers, records)
            print(
                f"produced {len(records)} records to {EVENTS_TOPIC} ({STORM_SIZE} of them a storm of failures); "
                "routing, grouped alerts wait for their group_wait (up to a minute) …"
            )
            while not stop.is_set() and not running.done() and not _settled(service, len(records)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
            alerts = await read_topic({"bootstrap_servers": broker.bootstrap_servers}, ALERTS_TOPIC)
            dead = await read_topic({"bootstrap_servers": broker.bootstrap_servers}, DLQ_TOPIC)
            print_summary(outbox, smtp, dingtalk, alerts, dead, expected)
            groups = sum(
                service.metrics.group_messages.labels(channel)._value.get() for channel in engine.settings.channels
            )
            print(
                f"\nthe storm of {STORM_SIZE} failed tasks was grouped: {groups:g} group messages in all "
                "(rules/task-failures.yaml groups by project, task type and error code)"
            )
            if not exit_after:
                print(
                    "\nthe router keeps running: produce to topic imm-events on "
                    f"{broker.bootstrap_servers}; Ctrl-C stops everything"
                )
                await stop.wait()
            service.stop()
            await running
    return 0


def _settled(service: Service, produced: int) -> bool:
    return service.committed >= produced and service.idle


def print_summary(
    outbox: Path, smtp: SmtpCapture, dingtalk: FakeDingTalk, alerts: list[Any], dead: list[Any], expected: Counter[str]
) -> None:
    print("\nrouted:")
    print(
        f"  DingTalk robot  {len(dingtalk.messages):3} messages  → {outbox / 'dingtalk'}/ "
        f"({expected['oncall-dingtalk']} alerts, most of them grouped)"
    )
    for message in dingtalk.messages[:40]:
        body = message.get("markdown") or message.get("text") or {}
        print(f"      {str(body.get('title', body.get('content', '')))[:90]}")
    print(f"  email           {len(smtp.messages):3} messages  → {outbox / 'email'}/")
    for received in smtp.messages[:40]:
        print(f"      {received.subject[:90]}")
    print(f"  Kafka {ALERTS_TOPIC:10} {len(alerts):3} records")
    rules = Counter(dict(r.headers).get("imm-rule", b"?").decode() for r in alerts)
    for rule, count in sorted(rules.items()):
        print(f"      {rule}: {count}")
    print(f"  dead letters    {len(dead):3} records")
    for record in dead:
        print(f"      {dict(record.headers).get('imm-dlq-reason', b'?').decode()[:100]}")
