"""DingTalk robot pools against the embedded DingTalk server with several robots: each robot keeps its
own 20-a-minute window, sends go to a robot with room, digests start only once every robot is full,
and no robot's token or secret shows anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from router.alerting.manager import Manager
from router.channels.base import RateLimit
from router.cli import main
from router.delivery.limiter import LimiterPool
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.embedded.dingtalk import FakeDingTalk
from router.errors import ConfigError
from router.metrics import Metrics
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

EVENTS = 100
# Three robots of one group: two signed (different secrets), one not.
ROBOTS: dict[str, str | None] = {
    "tok-POOL-a1b2c3d4": "SEC-POOL-first-0123456789abcdef",
    "tok-POOL-e5f6a7b8": None,
    "tok-POOL-c9d0e1f2": "SEC-POOL-third-fedcba9876543210",
}


def pool_config(server: FakeDingTalk, robots: dict[str, str | None] = ROBOTS, **extra: Any) -> dict[str, Any]:
    members = [{"url": server.webhook_url(t), **({"secret": s} if s else {})} for t, s in robots.items()]
    return {"type": "dingtalk", "robots": members, **extra}


async def test_100_alerts_in_a_minute_over_3_robots_none_over_its_limit(tmp_path: Path) -> None:
    clock = VirtualClock()
    # The server counts on the same virtual clock: 20 in any 60 s per robot, then 10 minutes of 130101.
    async with FakeDingTalk(ROBOTS, rate_limit=20, rate_window=60, throttle_for=600, clock=clock) as server:
        engine = make_engine(tmp_path, {"oncall": pool_config(server)})
        batch = notifications(engine, [failed_event(i) for i in range(EVENTS)])
        metrics = Metrics()
        delivery = virtual_delivery(engine, clock, metrics)

        try:
            outcomes = await arriving_over_a_minute(clock, delivery, batch)
        finally:
            await delivery.close(1)
    accepted = server.accepted.items
    texts = [r.payload["markdown"]["text"] for r in accepted]
    assert server.errcodes[130101] == 0 and len(server.requests) == len(accepted)
    assert not [task_id(i) for i in range(EVENTS) if not any(task_id(i) in text for text in texts)]
    per_robot = {token: sum(r.token == token for r in accepted) for token in ROBOTS}
    first_digest = next(i for i, text in enumerate(texts) if "告警汇总" in text)
    # Singles until every robot has had its 20; only then digests.
    assert first_digest == 60 and all(sum(r.token == t for r in accepted[:60]) == 20 for t in ROBOTS)
    assert outcomes.count("sent") == 60 and outcomes.count("digested") == EVENTS - 60
    assert counted(metrics, "notifications_digested", "oncall") == EVENTS - 60
    print(
        f"\npool: {EVENTS} alerts over 60 s, 3 robots -> {len(accepted)} messages "
        f"({outcomes.count('sent')} single, {len(texts) - first_digest} digests), "
        f"per robot {list(per_robot.values())}, "
        f"130101: {server.errcodes[130101]}, simulated {clock.elapsed:.1f} s"
    )


def test_each_member_keeps_its_own_window_and_the_logs_move_to_the_next_owner() -> None:
    clock = VirtualClock()
    pool = LimiterPool(RateLimit(per_minute=2), 3, clock=clock, sleep=clock.sleep)
    slots = [pool.try_acquire() for _ in range(6)]
    assert all(slots) and pool.try_acquire() is None
    assert sorted(s.member for s in slots if s) == [0, 0, 1, 1, 2, 2]  # spread: the least used first
    for slot in slots:
        assert slot is not None
        slot.release()
    logs = pool.snapshot(wall_now=1_000.0, pending_seconds=10)
    assert [len(log) for log in logs] == [2, 2, 2]
    taker = LimiterPool(RateLimit(per_minute=2), 3, clock=clock, sleep=clock.sleep)
    taker.restore(logs, wall_now=1_000.0)
    assert taker.try_acquire() is None  # the next owner inherits every robot's window
    taker.configure(RateLimit(per_minute=2), 4)  # a robot added on reload has room at once
    slot = taker.try_acquire()
    assert slot is not None and slot.member == 3
    clock.advance(62)
    assert taker.try_acquire() is not None


class ChangelogRecorder:
    """The changelog partition in memory: (key, value) in the order written."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []

    async def put(self, partition: int, key: str, value: dict[str, Any] | None) -> None:
        self.entries.append((key, json.loads(json.dumps(value))))


async def test_the_next_owner_of_a_pool_channel_resumes_every_robots_window(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with FakeDingTalk(ROBOTS, rate_limit=1, rate_window=60, clock=clock) as server:
        engine = make_engine(tmp_path, {"pool": pool_config(server, rate_limit={"per_minute": 1})})
        batch = notifications(engine, [failed_event(i) for i in range(4)])
        changelog = ChangelogRecorder()

        def take_over() -> Delivery:
            """A new owner of partition 0, which holds the channel, resuming from the changelog."""
            delivery = Delivery(engine, {}, Metrics(), clock=clock, sleep=clock.sleep, before_send=persist)
            manager = Manager(engine, delivery, Metrics(), changelog=changelog, dead_letter=never, clock=clock)
            manager.assign(0, changelog.entries)
            manager.channel_partition["pool"] = 0
            owner.append(manager)
            return delivery

        async def persist(channel: str, logs: list[list[float]]) -> None:
            await owner[-1].persist_limiter(channel, logs)

        async def never(*_: Any) -> None:
            raise AssertionError("nothing is dead-lettered")

        owner: list[Manager] = []
        first = take_over()
        try:
            assert await asyncio.gather(*(first.deliver(n) for n in batch[:3])) == ["sent"] * 3
        finally:
            await first.close(1)
        key, value = changelog.entries[-1]
        assert key == "l|pool" and [len(value["times"]), *map(len, value["pool"])] == [1, 1, 1]
        second = take_over()
        started = clock.now
        try:
            assert await second.deliver(batch[3]) == "sent"
        finally:
            await second.close(1)
    assert clock.now - started >= 59  # every robot had sent in this minute: the fourth waited for a window
    assert server.errcodes[130101] == 0 and len(server.accepted) == 4


async def test_secrets_of_every_robot_stay_masked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "SEC-POOL-wrong-00112233"
    secrets = [*ROBOTS, *(s for s in ROBOTS.values() if s), wrong]
    async with FakeDingTalk(ROBOTS) as server:
        robots = dict(ROBOTS)
        robots["tok-POOL-c9d0e1f2"] = wrong  # the third robot signs with a wrong secret
        engine = make_engine(tmp_path, {"pool": pool_config(server, robots, rate_limit={"per_minute": 1})})
        metrics = Metrics()
        delivery = Delivery(engine, {}, metrics)
        caplog.set_level(logging.DEBUG)
        try:
            outcomes = await asyncio.gather(
                *(delivery.deliver(n) for n in notifications(engine, [failed_event(i) for i in range(3)])),
                return_exceptions=True,
            )
            health = await delivery.channels["pool"].health()
        finally:
            await delivery.close(1)
    failed = [o for o in outcomes if isinstance(o, DeliveryFailed)]
    assert outcomes.count("sent") == 2 and len(failed) == 1
    assert "robot 3 of 3: errcode 310000" in failed[0].reason
    event = tmp_path / "event.json"
    event.write_text(json.dumps(failed_event(7)))
    assert main(["route", "--config", str(tmp_path / "router.yaml"), str(event)]) == 0
    assert main(["check", "--config", str(tmp_path / "router.yaml")]) == 0
    shown = [str(failed[0]), health, caplog.text, generate_latest(metrics.registry).decode(), capsys.readouterr().out]
    shown.append(repr(engine.settings.channels["pool"]))
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert "310000" in caplog.text and task_id(7) in shown[4]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "give url"),
        ({"url": "https://oapi.dingtalk.com/robot/send?access_token=t", "robots": "ROBOTS"}, "give url"),
        ({"robots": "ROBOTS", "secret": "SEC-POOL-shared"}, "each robot its own secret"),
        ({"robots": [{"url": "https://oapi.dingtalk.com/robot/send"}]}, "access_token"),
    ],
)
def test_pool_config_errors(tmp_path: Path, config: dict[str, Any], problem: str) -> None:
    robots = [{"url": f"https://oapi.dingtalk.com/robot/send?access_token={t}"} for t in ROBOTS]
    config = {k: robots if v == "ROBOTS" else v for k, v in config.items()}
    with pytest.raises(ConfigError, match=problem) as caught:
        make_engine(tmp_path, {"pool": {"type": "dingtalk", **config}})
    assert not any(token in str(caught.value) for token in ROBOTS)
