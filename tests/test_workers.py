"""``service.workers: 2``: one `imm-router run` supervising two router processes against a real broker —
both consume, nothing is lost, the pod's port speaks for both, a dead worker comes back, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.embedded import free_port, start_router
from router.embedded.broker import TansuBroker
from tests.test_service import alert_ids, committed, create_topic, failed_task, kafka_router, produce, wait_until


def workers_router(tmp_path: Path, bootstrap: str, topic: str, alerts: str, port: int) -> Path:
    path = kafka_router(tmp_path, bootstrap, topic, alerts)
    doc = json.loads(path.read_text())
    doc["service"]["workers"] = 2
    doc["http"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    path.write_text(json.dumps(doc))
    return path


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with http.get(url) as response:
            body = await response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, json.loads(body) if "json" in kind else body.decode()
    except aiohttp.ClientError:
        return 0, None  # the supervisor is not listening yet


async def ready(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """Wait until /readyz says every worker is ready; its report."""
    seen: dict[str, Any] = {}

    async def poll() -> bool:
        status, body = await get(http, f"{base}/readyz")
        seen["report"] = body
        return status == 200

    deadline = asyncio.get_running_loop().time() + 60
    while not await poll():
        assert asyncio.get_running_loop().time() < deadline, f"workers not ready: {seen.get('report')}"
        await asyncio.sleep(0.1)
    return dict(seen["report"])


def consumed_by_worker(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "imm_router_records_consumed":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    worker = sample.labels["worker"]
                    counts[worker] = counts.get(worker, 0.0) + sample.value
    return counts


async def test_two_workers_share_the_partitions_lose_nothing_and_drain_on_sigterm(
    tansu: TansuBroker, unique_topic, tmp_path: Path
) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    await create_topic(tansu.bootstrap_servers, topic, partitions=4)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = workers_router(tmp_path, tansu.bootstrap_servers, topic, alerts, port)
    expected = {f"w-{i}" for i in range(200)}
    router = await start_router(path, tmp_path / "router.log")
    try:
        async with aiohttp.ClientSession() as http:
            report = await ready(http, base)
            assert [w["worker"] for w in report["workers"]] == [0, 1]
            assert len({w["pid"] for w in report["workers"]}) == 2 and router.pid not in {
                w["pid"] for w in report["workers"]
            }
            await produce(tansu.bootstrap_servers, topic, [(failed_task(t), []) for t in sorted(expected)])
            ids = await alert_ids(tansu.bootstrap_servers, alerts, expected)
            counts: dict[str, float] = {}

            async def all_counted() -> bool:
                status, text = await get(http, f"{base}/metrics")
                counts.update(consumed_by_worker(text) if status == 200 else {})
                return sum(counts.values()) == len(expected)

            while not await all_counted():
                await asyncio.sleep(0.1)
            # Both processes consumed: the four partitions were spread over the two workers.
            assert set(counts) == {"0", "1"} and all(c > 0 for c in counts.values()), counts
            # Other paths reach a worker: the silences API lists none.
            status, silences = await get(http, f"{base}/api/v1/silences")
            assert (status, silences) == (200, [])
    finally:
        router.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(router.wait(), 60)
    assert expected <= set(ids)
    assert code == 0, (tmp_path / "router.log").read_text()[-3000:]
    assert await committed(tansu.bootstrap_servers, f"{topic}-group", topic) == len(expected)


async def test_a_worker_that_dies_is_restarted(tansu: TansuBroker, unique_topic, tmp_path: Path) -> None:
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = workers_router(tmp_path, tansu.bootstrap_servers, topic, alerts, port)
    router = await start_router(path, tmp_path / "router.log")
    try:
        async with aiohttp.ClientSession() as http:
            before = await ready(http, base)
            victim = before["workers"][1]["pid"]
            os.kill(victim, signal.SIGKILL)
            await wait_until(
                lambda: "restarting" in (tmp_path / "router.log").read_text(), what="the supervisor to notice"
            )
            after = await ready(http, base)
            assert after["workers"][1]["pid"] != victim
            assert after["workers"][0]["pid"] == before["workers"][0]["pid"]
            # The restarted worker routes: an alert still comes through.
            await produce(tansu.bootstrap_servers, topic, [(failed_task("after-restart"), [])])
            await alert_ids(tansu.bootstrap_servers, alerts, {"after-restart"})
    finally:
        router.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(router.wait(), 60)
    assert code == 0, (tmp_path / "router.log").read_text()[-3000:]


def test_a_worker_dying_young_waits_longer_each_time_and_one_that_ran_a_while_starts_afresh() -> None:
    from router.workers import RESTART_BACKOFF_MAX, STABLE_SECONDS, restart_delay

    delays, delay = [], None
    for _ in range(7):  # crashing at start, again and again
        delay = restart_delay(delay, ran_for=2.0)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, RESTART_BACKOFF_MAX, RESTART_BACKOFF_MAX]
    # After a day of work it dies once: back in a second, not after the 30 s its crash loop reached.
    assert restart_delay(RESTART_BACKOFF_MAX, ran_for=STABLE_SECONDS) == 1.0
    assert restart_delay(RESTART_BACKOFF_MAX, ran_for=86_400.0) == 1.0
