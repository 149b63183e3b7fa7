"""End to end through a real broker (Tansu): events/s and latency of the router with the shipped rules
delivering to Kafka channels, beside a raw baseline in the same run (aiokafka getmany + JSON decode, no
routing), reported as a ratio.

Phase 1 (throughput): the baseline consumes N events (unique ids) produced up front; the router drains
the same N produced up front (a backlog, as after an outage), timed until every notification is
delivered. Phase 2 (latency): events are produced at half the measured router rate by a child
process; latency is the source record's timestamp → the notification record's timestamp.

Two mixes: the seed examples in turn (about a third of events alert), and one like production: 95%
events that alert no rule, spread over every type, 5% failures and blocks.

With ``--workers N``: the backlog again, drained by ``imm-router run`` (a child process) with 1 and with
N ``service.workers``, each timed from the routing group's first commit to the last alert.

Run: python bench/e2e_bench.py [--events N] [--mix seed|production] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router.alerting.topics import TopicSpec, ensure_topics
from router.decode import decode
from router.embedded.broker import TansuBroker
from router.embedded.demo import demo_records
from router.engine import load
from router.service import Service
from router.sources.kafka import read_topic

ROOT = Path(__file__).resolve().parent.parent
# kafka.fetch_max_wait_ms of the routers under test (--fetch-max-wait-ms): Tansu holds a fetch for most of
# this wait even when records arrive meanwhile (Kafka answers at once), so on Tansu it adds to latency.
FETCH_MAX_WAIT_MS = [25]
# The router's CPU time per event in each run_router (all its threads; the bench's own loop only sleeps).
CPU_PER_EVENT: list[float] = []


Values = list[tuple[bytes, list[tuple[str, bytes]]]]


def seed_values(n: int, mix: str = "seed") -> Values:
    """``n`` records of the seed examples with unique ids. ``seed``: every example in turn (about a third
    alert); ``production``: 95% drawn from the examples that alert no rule, 5% from those that do."""
    seeds = [(value, headers) for _, value, headers in demo_records()[:-1]]
    if mix == "production":
        with tempfile.TemporaryDirectory() as tmp:
            engine = load(bench_config(Path(tmp), "127.0.0.1:9", "classify"))
        alerting = [s for s in seeds if engine.route(decode(*s)).notifications]
        quiet = [s for s in seeds if s not in alerting]
        seeds = [alerting[i % len(alerting)] if i % 20 == 0 else quiet[i % len(quiet)] for i in range(20 * len(quiet))]
    out = []
    for i in range(n):
        value, headers = seeds[i % len(seeds)]
        # Unique ids, so duplicate suppression does not hide work (and no two deliveries wait on each other).
        suffix = f"-{i}".encode()
        headers = [(k, v + suffix if k == "ce_id" else v) for k, v in headers]
        if not headers:
            wrapped = not value.lstrip().startswith(b"{")  # a whole record in base64, as MNS publishers do
            obj = json.loads(base64.b64decode(value) if wrapped else value)
            if "id" in obj:
                obj["id"] = f"{obj['id']}-{i}"
            else:
                obj["RequestId"] = f"req-{i}"
            value = json.dumps(obj, ensure_ascii=False).encode()
            if wrapped:
                value = base64.b64encode(value)
        out.append((value, headers))
    return out


async def produce(bootstrap: str, topic: str, values: Values, rate: float | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        start = time.perf_counter()
        futures = []
        for i, (value, headers) in enumerate(values):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(await producer.send(topic, value=value, headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_baseline(bootstrap: str, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id="raw-baseline",
        enable_auto_commit=False,
        session_timeout_ms=1000,
        heartbeat_interval_ms=200,
    )
    await consumer.start()
    seen, start = 0, time.perf_counter()
    try:
        while seen < n:
            for batch in (await consumer.getmany(timeout_ms=200, max_records=2000)).values():
                for record in batch:
                    value = record.value
                    if value[:1] not in (b"{", b"["):
                        value = base64.b64decode(value)
                    orjson.loads(value)
                    seen += 1
        return n / (time.perf_counter() - start)
    finally:
        await consumer.stop()


def bench_config(directory: Path, bootstrap: str, topic: str, workers: int = 1) -> Path:
    # The shipped rules, each notifying one Kafka channel with the shipped Kafka template.
    rules = directory / "rules"
    rules.mkdir()
    for source in sorted((ROOT / "rules").glob("*.yaml")):
        doc = yaml.safe_load(source.read_text())
        for rule in doc["rules"]:
            rule["notify"] = [{"channel": "alerts-topic", "template": "kafka/alert.json.j2"}]
        (rules / source.name).write_text(yaml.safe_dump(doc, allow_unicode=True))
    path = directory / "router.yaml"
    path.write_text(
        json.dumps(
            {
                "rules_dir": str(rules),
                "templates_dir": str(ROOT / "templates"),
                "channels": {"alerts-topic": {"type": "kafka", "topic": f"{topic}-alerts-topic", "concurrency": 1000}},
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topics": [topic],
                    "group_id": f"{topic}-router",
                    "dead_letter_topic": f"{topic}-dlq",
                    "notifications_topic": f"{topic}-notifications",
                    "changelog_topic": f"{topic}-changelog",
                    "silences_topic": f"{topic}-silences",
                    "inhibitions_topic": f"{topic}-inhibitions",
                    "session_timeout_ms": 1000,
                    "heartbeat_interval_ms": 200,
                    "fetch_max_wait_ms": FETCH_MAX_WAIT_MS[0],
                },
                "service": {
                    "dedup_ttl_seconds": 0,
                    "workers": workers,
                    # Workers are timed from their group's first commit (see run_workers).
                    "commit_interval_seconds": 0.05 if workers > 1 else 1.0,
                },
                "http": {"enabled": False},
            }
        )
    )
    return path


async def run_router(bootstrap: str, topic: str, values: Values, rate: float | None) -> tuple[float, int, list[float]]:
    """(events/s, notifications delivered, latencies in ms) for the router on ``values``.

    ``rate`` None: a backlog, as after an outage: every record is in the topic before the router starts,
    as for the raw baseline; the clock starts once the first records are routed (the routing group has
    joined; the notify group's join, if later, counts against the router) and the records routed by then
    are not counted. Otherwise the router is warmed up on the first record (both groups joined), then the
    rest are produced at ``rate``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = bench_config(Path(tmp), bootstrap, topic)
        service = Service(load(path), path)
        if rate is None:
            await produce(bootstrap, topic, values)
        else:
            await produce(bootstrap, topic, values[:1])
        task = asyncio.create_task(service.run())
        # Warmed up: the first record routed, and (at a rate) the notify stage owning its partitions with
        # their state read, and the warm-up's notifications delivered.
        while service.settled < 1 or (rate is not None and not (service.owned_partitions and delivered(service, 1))):
            await asyncio.sleep(0.001)
        start, before, start_ms = time.perf_counter(), service.settled, time.time() * 1000
        cpu = time.process_time()
        producing = asyncio.create_task(produce_elsewhere(bootstrap, topic, values[1:], rate, Path(tmp)))
        # Done when every record is routed and every notification it made is delivered (offsets are
        # committed within commit_interval_seconds after: bookkeeping, not work).
        while not delivered(service, len(values)):
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        CPU_PER_EVENT.append(cpu / (len(values) - before))
        await producing
        service.stop()
        await task
    latencies: list[float] = []
    source_times = await _source_times(bootstrap, topic)
    out = await read_topic({"bootstrap_servers": bootstrap}, f"{topic}-alerts-topic")
    for record in out:
        event_id = dict(record.headers).get("imm-event-id", b"").decode()
        if event_id in source_times and source_times[event_id] >= start_ms:  # not the warm-up's
            latencies.append(record.timestamp - source_times[event_id])
    return (len(values) - before) / elapsed, len(out), latencies


async def run_workers(bootstrap: str, topic: str, values: Values, workers: int) -> float:
    """Events/s of ``imm-router run`` with ``service.workers`` processes draining ``values`` as a backlog,
    timed from the routing group's first commit to the last alert (counted on the alerts topic)."""
    with tempfile.TemporaryDirectory() as tmp:
        with tempfile.TemporaryDirectory() as scratch:
            engine = load(bench_config(Path(scratch), bootstrap, topic))
        expected = sum(len(engine.route(decode(value, headers)).notifications) for value, headers in values)
        path = bench_config(Path(tmp), bootstrap, topic, workers)
        await produce(bootstrap, topic, values)
        # Only reads the router group's commits (never joins it).
        group = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"{topic}-router", enable_auto_commit=False)
        alerts = AIOKafkaConsumer(f"{topic}-alerts-topic", bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await group.start()
        await alerts.start()
        partitions = [TopicPartition(topic, p) for p in sorted(group.partitions_for_topic(topic) or ())]
        router = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "run", "--config", str(path), stderr=asyncio.subprocess.DEVNULL, cwd=ROOT
        )
        try:
            before = 0
            while before == 0:
                before = sum([await group.committed(tp) or 0 for tp in partitions])
                await asyncio.sleep(0.01)
            start, seen = time.perf_counter(), 0
            while seen < expected:
                seen += sum(len(b) for b in (await alerts.getmany(timeout_ms=100)).values())
            elapsed = time.perf_counter() - start
        finally:
            router.send_signal(signal.SIGTERM)
            await router.wait()
            await alerts.stop()
            await group.stop()
    return (len(values) - before) / elapsed


async def produce_elsewhere(bootstrap: str, topic: str, values: Values, rate: float | None, tmp: Path) -> None:
    """Produce ``values`` at ``rate`` from a child process: the producer must not share the router's
    process (its event loop and GIL), as no producer does in production."""
    if rate is None:
        return
    source = tmp / "values.json"
    source.write_bytes(
        orjson.dumps([[base64.b64encode(v).decode(), [[k, h.decode()] for k, h in hs]] for v, hs in values])
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--produce",
        str(source),
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--rate",
        str(rate),
    )
    if await child.wait() != 0:
        raise RuntimeError(f"the producer process failed ({child.returncode})")


def delivered(service: Service, records: int) -> bool:
    """Every record routed, and every notification handed off by then delivered by the notify stage."""
    handed_off = service.metrics.handoffs._value.get()
    notify = service.notify.settled if service.notify is not None else 0
    return service.settled >= records and notify >= handed_off and service.idle


async def _source_times(bootstrap: str, topic: str) -> dict[str, int]:
    times = {}
    for record in await read_topic({"bootstrap_servers": bootstrap}, topic):
        event = decode(record.value, record.headers)
        times[event.id] = record.timestamp
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


async def main(n: int, mixes: list[str], workers: int) -> None:
    print(
        f"events: {n} per mix; seed examples: {len(demo_records()) - 1}, every wire format; "
        f"kafka.fetch_max_wait_ms {FETCH_MAX_WAIT_MS[0]}"
    )
    for mix in mixes:
        values = seed_values(n + 1, mix)
        # Each phase on a broker of its own: Tansu's in-memory store slows down as it fills, and no phase
        # should pay for the records of the ones before it.
        async with fresh_topic(f"raw-{mix}", workers) as bootstrap:
            await produce(bootstrap, f"raw-{mix}", values[1:])
            raw = await raw_baseline(bootstrap, f"raw-{mix}", n)
        async with fresh_topic(f"thru-{mix}", workers) as bootstrap:
            rate, alerts, _ = await run_router(bootstrap, f"thru-{mix}", values, None)
        cpu = CPU_PER_EVENT[-1]
        half = rate / 2
        async with fresh_topic(f"lat-{mix}", workers) as bootstrap:
            _, _, latencies = await run_router(bootstrap, f"lat-{mix}", values[: min(n, int(half * 10)) + 1], half)
        print(f"[{mix} mix] {alerts / n:.0%} of events alert")
        print(f"  raw baseline (getmany + JSON decode): {raw:10,.0f} ev/s")
        print(
            f"  router, shipped rules → Kafka:        {rate:10,.0f} ev/s   ratio {rate / raw:.2f}x   "
            f"(CPU {cpu * 1e6:.0f} µs/event)"
        )
        print(
            f"  latency at {half:,.0f} ev/s (half the router rate), {len(latencies)} notifications: "
            f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
            f"max {max(latencies or [0]):.1f} ms"
        )
        if workers > 1:
            async with fresh_topic(f"one-{mix}", workers) as bootstrap:
                one = await run_workers(bootstrap, f"one-{mix}", values, 1)
            async with fresh_topic(f"many-{mix}", workers) as bootstrap:
                many = await run_workers(bootstrap, f"many-{mix}", values, workers)
            print(
                f"  imm-router run, 1 worker: {one:10,.0f} ev/s ({one / raw:.2f}x raw); "
                f"{workers} workers: {many:10,.0f} ev/s ({many / raw:.2f}x raw, {many / one:.2f}x one)"
            )


@contextlib.asynccontextmanager
async def fresh_topic(topic: str, workers: int) -> AsyncIterator[str]:
    """A broker of its own with ``topic`` in as many partitions as the workers may use; its address."""
    async with TansuBroker() as broker:
        await ensure_topic(broker.bootstrap_servers, topic, max(4, workers))
        yield broker.bootstrap_servers


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    await ensure_topics({"bootstrap_servers": bootstrap}, {topic: TopicSpec(partitions, compact=False)}, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--mix", choices=["seed", "production"], action="append", help="default: both")
    parser.add_argument("--workers", type=int, default=1, help="also time `imm-router run` with 1 and N workers")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=25, help="the routers' kafka.fetch_max_wait_ms")
    parser.add_argument("--produce", type=Path, help=argparse.SUPPRESS)  # the child of produce_elsewhere
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        records = [
            (base64.b64decode(v), [(k, h.encode()) for k, h in hs]) for v, hs in orjson.loads(args.produce.read_bytes())
        ]
        asyncio.run(produce(args.bootstrap, args.topic, records, args.rate))
        raise SystemExit(0)
    FETCH_MAX_WAIT_MS[0] = args.fetch_max_wait_ms
    asyncio.run(main(args.events, args.mix or ["seed", "production"], args.workers))
