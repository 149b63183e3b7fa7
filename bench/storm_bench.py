"""An alert storm through N real router processes (1, 3, ...) sharing one broker (Tansu): 2,000 failed-task
events over 3 projects x 2 error codes, spread over ~10 s, to a DingTalk robot that enforces its real limit
(20 messages in any 60 s, errcode 130101 beyond it) with Alertmanager-style grouping, and to a Kafka alerts
topic with one alert per event.

For each replica count: its own broker, robot and topics; the routers are started and the bench waits until
each owns notification partitions (the 6 of them shared out), produces the storm, then waits (bounded) until
every task id shows in an accepted DingTalk message and has a Kafka alert. Reported per replica count:
messages in and out, over-limit answers, the most robot requests in any 60 s, what grouping timings allow,
task ids lost, Kafka duplicates, and the time from the first event to the last task id delivered. The
routers are stopped with SIGTERM and must exit 0.

Run: python bench/storm_bench.py [--replicas 1 3] [--events 2000] [--rate 200] [--timeout 180]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from router.embedded import start_router
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import DingTalkRequest, FakeDingTalk

ROOT = Path(__file__).resolve().parent.parent

TOPIC = "storm"
ALERTS = "storm-alerts"
PARTITIONS = 6
PROJECTS = ("proj-0", "proj-1", "proj-2")
CODES = ("InvalidArgument", "ResourceNotFound")
GROUP_WAIT = 5.0
GROUP_INTERVAL = 30.0
ROBOT_LIMIT = 20  # messages in any 60 s, as DingTalk
TASK_ID = re.compile(r"t-\d{6}")
OWNING = re.compile(r"owning \S+ partitions \[?([0-9, ]*)\]?")


@dataclass
class Run:
    replicas: int
    events: int
    owning_after: float = 0.0  # routers started → every one owning (s)
    spread: float = 0.0  # first event → last event produced (s)
    first_event: float = 0.0  # epoch seconds
    requests: list[DingTalkRequest] = field(default_factory=list)
    delivered_dingtalk: dict[str, float] = field(default_factory=dict)  # task id → first accepted at (epoch)
    kafka: list[tuple[str, str, float]] = field(default_factory=list)  # (event id, task id, record time)
    exit_codes: list[int | None] = field(default_factory=list)
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)


def failed_task(i: int) -> bytes:
    task = f"t-{i:06d}"  # fixed width: no id is a prefix of another
    return orjson.dumps(
        {
            "TaskType": "MediaConvert",
            "TaskId": task,
            "RequestId": f"req-{task}",  # the event id, shown in group messages
            "Status": "Failed",
            "Code": CODES[i % len(CODES)],
            "ProjectName": PROJECTS[i % len(PROJECTS)],
            "URI": f"oss://bucket/{task}",
        }
    )


def write_config(directory: Path, bootstrap: str, robot: FakeDingTalk) -> Path:
    rules = directory / "rules"
    rules.mkdir()
    grouping = {"group_by": ["imm.project", "imm.error_code"], "group_wait": "5s", "group_interval": "30s"}
    rule = {
        "name": "task-failed",
        "events": ["imm:Task:*"],
        "when": "imm.outcome == 'failed'",
        "severity": "critical",
        "notify": [
            {"channel": "robot", "template": "dingtalk/task-failed.md.j2", **grouping},
            {"channel": "alerts-topic", "template": "kafka/alert.json.j2"},
        ],
    }
    (rules / "rules.yaml").write_text(json.dumps({"rules": [rule]}))
    path = directory / "router.yaml"
    path.write_text(
        json.dumps(
            {
                "rules_dir": str(rules),
                "templates_dir": str(ROOT / "templates"),
                "channels": {
                    "robot": {"type": "dingtalk", "url": robot.webhook_url("tok"), "secret": "sec"},
                    "alerts-topic": {"type": "kafka", "topic": ALERTS},
                },
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topics": [TOPIC],
                    "group_id": f"{TOPIC}-router",
                    "dead_letter_topic": f"{TOPIC}-dlq",
                    "notifications_topic": f"{TOPIC}-notifications",
                    "notifications_partitions": PARTITIONS,
                    "changelog_topic": f"{TOPIC}-changelog",
                    "silences_topic": f"{TOPIC}-silences",
                    "inhibitions_topic": f"{TOPIC}-inhibitions",
                    "session_timeout_ms": 1000,
                    "heartbeat_interval_ms": 200,
                },
                "service": {"commit_interval_seconds": 0.1, "drain_timeout_seconds": 10},
                "http": {"enabled": False},
            }
        )
    )
    return path


async def create_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1), NewTopic(ALERTS, 1, 1)]
        )
    finally:
        await admin.close()


def owned(log: Path) -> set[int] | None:
    """The partitions the log's last "owning" line names (None before the first)."""
    found = OWNING.findall(log.read_text(errors="replace"))
    if not found:
        return None
    return {int(p) for p in found[-1].replace(",", " ").split()}


async def wait_owning(logs: list[Path], routers: list[asyncio.subprocess.Process], timeout: float) -> bool:
    """Until every router logged "owning" and their last such lines share out all partitions; False if only
    the first held (every one owning) when ``timeout`` ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n, r in enumerate(routers):
            if r.returncode is not None:
                raise RuntimeError(f"router {n} exited with {r.returncode}: {logs[n].read_text()[-2000:]}")
        sets = [owned(log) for log in logs]
        if all(s is not None for s in sets):
            union = [p for s in sets if s is not None for p in s]
            if sorted(union) == list(range(PARTITIONS)):
                return True
        await asyncio.sleep(0.1)
    if all(owned(log) is not None for log in logs):
        return False
    raise TimeoutError(f"not every router owning after {timeout}s")


async def produce_storm(bootstrap: str, events: int, rate: float) -> tuple[float, float]:
    """``events`` failed tasks at ``rate`` a second; returns (first sent, last sent) as epoch seconds."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        start, first = time.perf_counter(), time.time()
        futures = []
        for i in range(events):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(await producer.send(TOPIC, value=failed_task(i)))
        last = time.time()
        await asyncio.gather(*futures)
        return first, last
    finally:
        await producer.stop()


async def follow_alerts(bootstrap: str, into: list[tuple[str, str, float]]) -> None:
    """Read the Kafka alerts topic from its start, for ever (cancel to stop)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(ALERTS, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                for record in batch:
                    alert = orjson.loads(record.value)
                    into.append((alert["event"]["id"], alert["imm"]["task_id"], record.timestamp / 1000))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


def track_dingtalk(robot: FakeDingTalk, delivered: dict[str, float], seen: int) -> int:
    """Note the task ids of accepted messages from the ``seen``-th on; returns how many are read."""
    items = robot.accepted.items
    for request in items[seen:]:
        text = json.dumps(request.payload, ensure_ascii=False)
        for task in TASK_ID.findall(text):
            delivered.setdefault(task, request.received_at)
    return len(items)


async def stop_routers(routers: list[asyncio.subprocess.Process], grace: float = 30.0) -> list[int | None]:
    """SIGTERM all, wait up to ``grace`` s; SIGKILL whatever is left (its code is then reported as None)."""
    for r in routers:
        if r.returncode is None:
            r.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for r in routers:
        try:
            codes.append(await asyncio.wait_for(r.wait(), grace))
        except TimeoutError:
            r.kill()
            await r.wait()
            codes.append(None)
    return codes


async def run(replicas: int, events: int, rate: float, timeout: float, keep_logs: bool) -> Run:
    result = Run(replicas, events)
    tasks = {f"t-{i:06d}" for i in range(events)}
    with tempfile.TemporaryDirectory(prefix=f"storm-{replicas}-") as tmp:
        directory = Path(tmp)
        async with TansuBroker(log_path=directory / "tansu.log") as broker, FakeDingTalk({"tok": "sec"}) as robot:
            bootstrap = broker.bootstrap_servers
            await create_topics(bootstrap)
            path = write_config(directory, bootstrap, robot)
            logs = [directory / f"router-{n}.log" for n in range(replicas)]
            routers: list[asyncio.subprocess.Process] = []
            follower = asyncio.create_task(follow_alerts(bootstrap, result.kafka))
            try:
                started = time.monotonic()
                routers = [await start_router(path, log) for log in logs]
                if not await wait_owning(logs, routers, timeout=90):
                    result.notes.append("partitions not shared out evenly before the storm (took every one owning)")
                result.owning_after = time.monotonic() - started
                result.first_event, last_sent = await produce_storm(bootstrap, events, rate)
                result.spread = last_sent - result.first_event
                deadline, seen = time.monotonic() + timeout, 0
                while True:
                    seen = track_dingtalk(robot, result.delivered_dingtalk, seen)
                    kafka_ids = {task for _, task, _ in result.kafka}
                    if tasks <= result.delivered_dingtalk.keys() and tasks <= kafka_ids:
                        break
                    if time.monotonic() > deadline:
                        result.timed_out = True
                        break
                    for n, r in enumerate(routers):
                        if r.returncode is not None:
                            result.notes.append(f"router {n} exited early with {r.returncode}")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)  # late extras (e.g. a second message for a group) still count
                track_dingtalk(robot, result.delivered_dingtalk, seen)
            finally:
                result.exit_codes = await stop_routers(routers)
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
            result.requests = robot.requests.items
            result.notes.extend(log_notes(logs))
            if keep_logs:
                keep = Path(tempfile.mkdtemp(prefix=f"storm-bench-logs-{replicas}-"))
                for log in [*logs, directory / "tansu.log"]:
                    (keep / log.name).write_bytes(log.read_bytes())
                result.notes.append(f"logs kept in {keep}")
    return result


def log_notes(logs: list[Path]) -> list[str]:
    notes = []
    for n, log in enumerate(logs):
        text = log.read_text(errors="replace")
        problems = Counter(
            line.split(" ", 3)[-1][:100]
            for line in text.splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        )
        rebalances = len(OWNING.findall(text))
        if problems:
            top = "; ".join(f"{count}x {line}" for line, count in problems.most_common(3))
            notes.append(f"router {n}: {sum(problems.values())} warning/error lines, e.g. {top}")
        if rebalances > 1:
            notes.append(f"router {n}: {rebalances} 'owning' lines (rebalances)")
    return notes


def most_in_window(times: list[float], window: float = 60.0) -> int:
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def timing_bound(spread: float) -> int:
    """Messages grouping allows: per group one at group_wait, then one per group_interval while alerts come."""
    groups = len(PROJECTS) * len(CODES)
    return groups * (1 + max(0, math.ceil((spread - GROUP_WAIT) / GROUP_INTERVAL)))


def report(runs: list[Run]) -> None:
    header = [
        "replicas",
        "events in",
        "DingTalk msgs",
        "timing bound",
        "over-limit 130101",
        "max req/60 s",
        "Kafka alerts",
        "lost DingTalk",
        "lost Kafka",
        "Kafka dups",
        "first event → last id (s)",
        "owning after (s)",
        "exit codes",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in runs:
        tasks = {f"t-{i:06d}" for i in range(r.events)}
        accepted = [q for q in r.requests if q.accepted]
        over = sum(1 for q in r.requests if q.errcode == 130101)
        kafka_first: dict[str, float] = {}
        for _, task, at in r.kafka:
            kafka_first.setdefault(task, at)
        event_ids = Counter(event_id for event_id, _, _ in r.kafka)
        dups = sum(c - 1 for c in event_ids.values())
        lost_dt = len(tasks - r.delivered_dingtalk.keys())
        lost_kafka = len(tasks - kafka_first.keys())
        done = [
            max(r.delivered_dingtalk[t], kafka_first[t])
            for t in tasks
            if t in r.delivered_dingtalk and t in kafka_first
        ]
        last = f"{max(done) - r.first_event:.1f}" if done else "-"
        if r.timed_out:
            last += " (timed out)"
        row = [
            r.replicas,
            r.events,
            len(accepted),
            timing_bound(r.spread),
            over,
            most_in_window([q.received_at for q in r.requests]),
            len(r.kafka),
            lost_dt,
            lost_kafka,
            dups,
            last,
            f"{r.owning_after:.1f}",
            ",".join("killed" if c is None else str(c) for c in r.exit_codes),
        ]
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()
    for r in runs:
        dingtalk_last = max(r.delivered_dingtalk.values(), default=r.first_event) - r.first_event
        kafka_last = max((at for _, _, at in r.kafka), default=r.first_event) - r.first_event
        per_group = Counter(group_of(q.payload) for q in r.requests if q.accepted)
        parts = sum(1 for q in r.requests if q.accepted and "(part " in json.dumps(q.payload, ensure_ascii=False))
        lines = [
            f"events produced over {r.spread:.1f} s; last DingTalk id at {dingtalk_last:.1f} s, "
            f"last Kafka alert at {kafka_last:.1f} s after the first event",
            "DingTalk messages per group: " + ", ".join(f"{g} {c}" for g, c in sorted(per_group.items())),
        ]
        if parts:
            lines.append(f"{parts} DingTalk messages are parts of a split group message")
        lines.extend(r.notes)
        print(f"{r.replicas} replica(s): " + "\n  ".join(lines))


def group_of(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False)
    project = re.search(r"proj-\d", text)
    code = next((c for c in CODES if c in text), "?")
    return f"{project.group(0) if project else '?'}/{code}"


async def main(replicas: list[int], events: int, rate: float, timeout: float, keep_logs: bool) -> None:
    runs = []
    for n in replicas:
        runs.append(await run(n, events, rate, timeout, keep_logs))
    print(
        f"storm: {events} failed-task events at {rate:.0f}/s over {len(PROJECTS)} projects x {len(CODES)} error "
        f"codes; DingTalk: group_by project+code, group_wait {GROUP_WAIT:.0f}s, group_interval "
        f"{GROUP_INTERVAL:.0f}s, robot limit {ROBOT_LIMIT}/60 s; Kafka: one alert per event"
    )
    report(runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="events a second")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every delivery")
    parser.add_argument("--keep-logs", action="store_true", help="copy the router and broker logs out")
    args = parser.parse_args()
    asyncio.run(main(args.replicas, args.events, args.rate, args.timeout, args.keep_logs))
