"""Helpers for the channel and delivery tests (no tests here): a real Engine over the shipped templates
with channels pointing at the embedded servers, IMM events, and a virtual clock.

PYTEST_DONT_REWRITE"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from router.channels.base import Channel
from router.decode import decode_object
from router.delivery.pipeline import Delivery
from router.engine import Engine, load
from router.errors import DeliveryError
from router.metrics import Metrics
from router.notification import Notification

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {
    "alertmanager": "alertmanager/alert.j2",
    "dingtalk": "dingtalk/task-failed.md.j2",
    "email": "email/task-failed.j2",
    "kafka": "kafka/alert.json.j2",
    "webhook": "webhook/alert.json.j2",
}


async def send_all(channel: Channel, batch: Iterable[Notification]) -> None:
    """Send each notification on one channel, then close it."""
    try:
        for notification in batch:
            await channel.send(notification)
    finally:
        await channel.close()


async def send_failing(channel: Channel, notification: Notification) -> DeliveryError:
    """The error of one send that must fail; the channel is closed either way."""
    try:
        with pytest.raises(DeliveryError) as caught:
            await channel.send(notification)
    finally:
        await channel.close()
    return caught.value


def make_engine(
    tmp_path: Path, channels: dict[str, dict[str, Any]], *, rule_labels: dict[str, str] | None = None, **settings: Any
) -> Engine:
    """An Engine with ``channels`` (name -> config) and one rule, task-failed (with ``rule_labels``),
    notifying all of them with the shipped template of their type (``<type>/alert.j2`` for others).
    ``settings`` go into the config file's top level."""
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    # A third-party type (tests/test_plugins.py) uses <type>/alert.j2.
    notify = [
        {"channel": name, "template": TEMPLATES.get(config["type"], f"{config['type']}/alert.j2")}
        for name, config in channels.items()
    ]
    rule = {
        "name": "task-failed",
        "description": "IMM 任务失败 / An IMM task failed",
        "events": ["imm:Task:*"],
        "when": "imm.outcome == 'failed'",
        "severity": "critical",
        "labels": rule_labels or {},
        "notify": notify,
    }
    (rules / "r.yaml").write_text(json.dumps({"rules": [rule]}))
    doc = {"rules_dir": "rules", "templates_dir": str(ROOT / "templates"), "channels": channels, **settings}
    config = tmp_path / "router.yaml"
    config.write_text(json.dumps(doc))
    return load(config)


def failed_event(
    index: int, *, project: str = "test_project", event_id: str | None = None, time: str = "2026-11-02T10:00:00+08:00"
) -> dict[str, Any]:
    """An EventBridge MediaConvert failure whose task id is ``task-<index>``."""
    return {
        "specversion": "1.0",
        "id": event_id or f"evt-{index:05d}",
        "source": "acs.imm",
        "type": "imm:Task:MediaConvert",
        "subject": "acs.imm:cn-hangzhou:1234567890:task",
        "time": time,
        "data": {
            "ProjectName": project,
            "TaskType": "MediaConvert",
            "TaskId": task_id(index),
            "Status": "Failed",
            "Code": "InvalidParameter",
            "Message": "源文件无法解码 / the source cannot be decoded",
        },
    }


async def arriving_over_a_minute(clock: VirtualClock, delivery: Delivery, batch: list[Notification]) -> list[str]:
    """Deliver ``batch`` with its arrivals spread evenly over a (virtual) minute; the outcomes."""

    async def arrive(index: int) -> str:
        await clock.sleep(index * 60 / len(batch))
        return await delivery.deliver(batch[index])

    return await asyncio.gather(*(arrive(i) for i in range(len(batch))))


def virtual_delivery(engine: Engine, clock: VirtualClock, metrics: Metrics | None = None) -> Delivery:
    """Delivery whose retries, backoff and rate limits run on ``clock``."""
    return Delivery(engine, {}, metrics or Metrics(), clock=clock, sleep=clock.sleep)


def task_id(index: int) -> str:
    return f"task-{index:05d}"


def notifications(engine: Engine, events: Iterable[dict[str, Any]], channel: str | None = None) -> list[Notification]:
    """What the engine makes of ``events`` (for ``channel`` only, if given)."""
    found = []
    for doc in events:
        result = engine.route(decode_object(doc))
        assert not result.failures, result.failures
        found += [n for n in result.notifications if channel is None or n.channel == channel]
    return found


def counted(metrics: Metrics, counter: str, channel: str) -> float:
    """A channel's counter value, e.g. ``counted(m, "notifications_sent", "ding")``."""
    value = metrics.registry.get_sample_value(f"imm_router_{counter}_total", {"channel": channel})
    return value or 0.0


class VirtualClock:
    """Virtual monotonic time for Delivery (clock=, sleep=) and FakeDingTalk (clock=).

    Nothing waits for real: once the tasks that can run have run, time jumps to the earliest sleeper's
    deadline and wakes it. Time may also jump while a request is on the wire; the code under test must
    be (and the rate limiter is) correct for any latency, so that only makes the test harder."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.start = start
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._driver: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._running.set()

    def __call__(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - self.start

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._order), future))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        await future

    def pause(self) -> None:
        """Stop time (sleepers stay asleep) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def advance(self, seconds: float) -> None:
        """Move time forward without waking anyone (a sleeper past its deadline wakes on the next jump)."""
        self.now += seconds

    async def _drive(self) -> None:
        while self._sleepers:
            for _ in range(50):  # let whatever is ready run first
                await asyncio.sleep(0)
            await self._running.wait()
            deadline, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                self.now = max(self.now, deadline)
                future.set_result(None)
