"""A storm: 500 failed tasks within a minute to one DingTalk robot that throttles like the real one
(20 in any 60 s, then 10 minutes of 130101). Nothing may be throttled and every alert must be seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.embedded.dingtalk import FakeDingTalk
from router.metrics import Metrics
from tests.servers import DINGTALK_SECRET, DINGTALK_SIGNED_TOKEN
from tests.test_delivery_support import (
    VirtualClock,
    arriving_over_a_minute,
    counted,
    failed_event,
    make_engine,
    notifications,
    task_id,
    virtual_delivery,
)

pytestmark = pytest.mark.timeout(60)

EVENTS = 500


async def test_a_storm_becomes_a_few_digests_and_is_never_throttled(tmp_path: Path) -> None:
    clock = VirtualClock()
    robots: dict[str, str | None] = {DINGTALK_SIGNED_TOKEN: DINGTALK_SECRET}
    # The server counts time on the same virtual clock: its window and throttle are the real ones.
    async with FakeDingTalk(robots, rate_limit=20, rate_window=60, throttle_for=600, clock=clock) as robot:
        config = {"type": "dingtalk", "url": robot.webhook_url(DINGTALK_SIGNED_TOKEN), "secret": DINGTALK_SECRET}
        engine = make_engine(tmp_path, {"oncall": config})  # rate_limit: DingTalk's default, 20 a minute
        batch = notifications(engine, [failed_event(i) for i in range(EVENTS)])
        metrics = Metrics()
        delivery = virtual_delivery(engine, clock, metrics)
        robot.fail_next(3, errcode=-1)  # "busy" at the start: the retries count against the budget too

        try:
            outcomes = await arriving_over_a_minute(clock, delivery, batch)
        finally:
            await delivery.close(1)
    texts = [r.payload["markdown"]["text"] for r in robot.accepted]
    assert robot.errcodes[130101] == 0
    missing = [task_id(i) for i in range(EVENTS) if not any(task_id(i) in text for text in texts)]
    assert not missing
    digests = [t for t in texts if "告警汇总" in t]
    alerts_per_digest = [sum(task_id(i) in t for i in range(EVENTS)) for t in digests]
    assert outcomes.count("sent") + outcomes.count("digested") == EVENTS
    assert sum(alerts_per_digest) == outcomes.count("digested") == counted(metrics, "notifications_digested", "oncall")
    assert len(texts) <= 40 and max(alerts_per_digest) <= 50
    print(
        f"\nstorm: {EVENTS} events over 60 s -> {len(robot.requests)} requests, {len(texts)} messages accepted "
        f"({outcomes.count('sent')} single, {len(digests)} digests of {alerts_per_digest} alerts), "
        f"130101: {robot.errcodes[130101]}, -1: {robot.errcodes[-1]}, simulated {clock.elapsed:.1f} s"
    )
