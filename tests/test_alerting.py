"""Alert management against a real broker (Tansu) and the embedded DingTalk robot: grouping, throttling,
inhibition (both orders), time intervals, ownership moving mid-group, and a storm through two router
processes (one of them killed) that never exceeds the robot's limit and loses no alert."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.alerting.handoff import Handoff, SourceRecord
from router.alerting.manager import Manager
from router.decode import decode_object
from router.delivery.pipeline import Delivery
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.engine import load
from router.errors import ConfigError
from router.metrics import Metrics
from router.service import Service
from tests.conftest import ROOT
from tests.test_delivery_support import failed_event, task_id
from tests.test_dingtalk_pool import ChangelogRecorder
from tests.test_service import config, produce, running, start_router, wait_until
from tests.test_silences import cli

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def failed(task_id: str, project: str = "p", code: str = "InvalidArgument", task_type: str = "MediaConvert") -> bytes:
    return json.dumps(
        {
            "TaskType": task_type,
            "TaskId": task_id,
            "RequestId": f"req-{task_id}",
            "Status": "Failed",
            "Code": code,
            "ProjectName": project,
            "URI": f"oss://bucket/{task_id}",
        }
    ).encode()


def blocked(task_id: str, project: str = "p") -> bytes:
    return json.dumps(
        {
            "TaskType": "ImageModeration",
            "TaskId": task_id,
            "RequestId": f"req-{task_id}",
            "Status": "Succeeded",
            "Suggestion": "block",
            "ProjectName": project,
            "URI": f"oss://bucket/{task_id}",
        }
    ).encode()


def write_rules(tmp_path: Path, notify: dict[str, Any], *, block_rule: bool = False) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "rules": [
            {
                "name": "task-failed",
                "events": ["imm:Task:*"],
                "when": "imm.outcome == 'failed'",
                "severity": "critical",
                "notify": [{"channel": "robot", "template": "dingtalk/task-failed.md.j2", **notify}],
            }
        ]
    }
    if block_rule:
        doc["rules"].append(
            {
                "name": "moderation-block",
                "events": ["imm:Task:*"],
                "when": "imm.moderation.suggestion == 'block'",
                "notify": [{"channel": "robot", "template": "dingtalk/moderation.md.j2"}],
            }
        )
    (rules / "rules.yaml").write_text(json.dumps(doc))
    return rules


def router_config(
    tmp_path: Path,
    tansu: TansuBroker,
    topic: str,
    robot: FakeDingTalk,
    notify: dict[str, Any],
    *,
    block_rule: bool = False,
    **top: Any,
) -> Path:
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=write_rules(tmp_path, notify, block_rule=block_rule),
        channels={"robot": {"type": "dingtalk", "url": robot.webhook_url("tok"), "secret": "sec"}},
    )
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, **top}))
    return path


@contextlib.asynccontextmanager
async def robot(**kwargs: Any) -> AsyncIterator[FakeDingTalk]:
    async with FakeDingTalk({"tok": "sec"}, **kwargs) as server:
        yield server


def texts(server: FakeDingTalk) -> list[str]:
    return [m["markdown"]["text"] for m in server.messages]


def ids_in(server: FakeDingTalk, ids: list[str]) -> set[str]:
    joined = "\n".join(texts(server))
    return {i for i in ids if i in joined}


async def test_a_group_collects_a_burst_into_one_message_per_group(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    async with robot() as server:
        notify = {"group_by": ["imm.project", "imm.error_code"], "group_wait": "2s", "group_interval": "1h"}
        path = router_config(tmp_path, tansu, topic, server, notify)
        tasks = [(f"g-{i}", f"proj-{i % 2}") for i in range(40)]
        async with running(path) as service:
            await produce(tansu.bootstrap_servers, topic, [(failed(t, p), []) for t, p in tasks])
            await server.wait_for(2, timeout=30)
            await wait_until(lambda: service.idle and service.committed == len(tasks), what="all settled")
            assert len(server.messages) == 2  # one per project: group_interval holds any later ones
        joined = texts(server)
        for project in ("proj-0", "proj-1"):
            [message] = [t for t in joined if f"imm.project**: {project}" in t]
            assert "20 alerts" in message
        assert ids_in(server, [t for t, _ in tasks]) == {t for t, _ in tasks}
        assert service.metrics.group_messages.labels("robot")._value.get() == 2


async def test_throttle_sends_the_first_alert_then_one_summary_of_the_held(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    async with robot() as server:
        notify = {"throttle": {"key": ["imm.project"], "for": "3s"}}
        path = router_config(tmp_path, tansu, topic, server, notify)
        async with running(path) as service:
            await produce(tansu.bootstrap_servers, topic, [(failed("t-first"), [])])
            await server.wait_for(1, timeout=20)
            await produce(tansu.bootstrap_servers, topic, [(failed(f"t-held-{i}"), []) for i in range(5)])
            await server.wait_for(2, timeout=20)
            held = service.metrics.suppressed.labels("robot", "throttled")._value.get()
        first, summary = texts(server)
        assert "t-first" in first and "t-held" not in first
        assert "5 alerts held by the throttle" in summary and all(f"t-held-{i}" in summary for i in range(5))
        assert held == 5


async def test_a_source_inhibits_targets_seen_after_it(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    inhibit = [{"source_rules": ["moderation-block"], "target_rules": ["task-failed"], "equal": ["imm.project"]}]
    async with robot() as server:
        path = router_config(tmp_path, tansu, topic, server, {}, block_rule=True, inhibit_rules=inhibit)
        async with running(path) as service:
            await produce(tansu.bootstrap_servers, topic, [(blocked("src-1", "p1"), [])])
            await server.wait_for(1, timeout=20)
            await produce(
                tansu.bootstrap_servers, topic, [(failed("tgt-same", "p1"), []), (failed("tgt-other", "p2"), [])]
            )
            await server.wait_for(2, timeout=20)
            await wait_until(lambda: service.idle and service.committed == 3, what="all settled")
            inhibited = service.metrics.suppressed.labels("robot", "inhibited")._value.get()
        assert ids_in(server, ["src-1", "tgt-same", "tgt-other"]) == {"src-1", "tgt-other"}
        assert inhibited == 1


async def test_a_source_inhibits_targets_still_waiting_in_group_wait(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    inhibit = [{"source_rules": ["moderation-block"], "target_rules": ["task-failed"], "equal": ["imm.project"]}]
    notify = {"group_by": ["imm.project"], "group_wait": "3s"}
    async with robot() as server:
        path = router_config(tmp_path, tansu, topic, server, notify, block_rule=True, inhibit_rules=inhibit)
        async with running(path) as service:
            await produce(tansu.bootstrap_servers, topic, [(failed("waiting", "p1"), [])])
            await wait_until(lambda: service.metrics.groups_open._value.get() == 1, what="the target's group")
            await produce(tansu.bootstrap_servers, topic, [(blocked("late-src", "p1"), [])])
            await server.wait_for(1, timeout=20)
            await wait_until(lambda: service.idle and service.committed == 2, timeout=20, what="the group settled")
            inhibited = service.metrics.suppressed.labels("robot", "inhibited")._value.get()
        assert ids_in(server, ["waiting", "late-src"]) == {"late-src"}
        assert inhibited == 1


async def test_mute_and_active_time_intervals(tansu, unique_topic, tmp_path: Path) -> None:
    today = WEEKDAYS[datetime.now(UTC).weekday()]
    other = WEEKDAYS[(datetime.now(UTC).weekday() + 3) % 7]
    intervals = [
        {"name": "today", "time_intervals": [{"weekdays": [today]}]},
        {"name": "another-day", "time_intervals": [{"weekdays": [other]}]},
    ]
    cases = [({"mute_time_intervals": ["today"]}, False), ({"active_time_intervals": ["another-day"]}, False)]
    cases += [({"active_time_intervals": ["today"], "mute_time_intervals": ["another-day"]}, True)]
    for i, (notify, sent) in enumerate(cases):
        topic = unique_topic(f"events{i}")
        async with robot() as server:
            case_dir = tmp_path / str(i)
            case_dir.mkdir()
            path = router_config(case_dir, tansu, topic, server, notify, time_intervals=intervals)
            async with running(path) as service:
                await produce(tansu.bootstrap_servers, topic, [(failed(f"w-{i}"), [])])
                await wait_until(lambda s=service: s.idle and s.committed == 1, what="the event settled")
                muted = service.metrics.suppressed.labels("robot", "muted")._value.get()
            assert (len(server.messages), muted) == ((1, 0) if sent else (0, 1)), notify


async def test_ownership_moves_mid_group_and_nothing_is_lost_or_sent_twice(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    async with robot() as server:
        notify = {"group_by": ["imm.project"], "group_wait": "4s", "group_interval": "1h"}
        path = router_config(tmp_path, tansu, topic, server, notify)
        tasks = [f"m-{i}" for i in range(30)]
        first = Service(load(path), path)
        first_run = asyncio.create_task(first.run())
        try:
            await produce(tansu.bootstrap_servers, topic, [(failed(t), []) for t in tasks[:15]])
            await wait_until(lambda: first.metrics.groups_open._value.get() == 1, what="the group on the first")
            async with running(path) as second:
                # The first leaves while its group waits: the channel's next owner reads the group again.
                first.stop()
                await asyncio.wait_for(first_run, 30)
                await produce(tansu.bootstrap_servers, topic, [(failed(t), []) for t in tasks[15:]])
                await server.wait_for(1, timeout=30)
                await wait_until(lambda: second.idle, timeout=20, what="the second settled")
        finally:
            first.stop()
            await asyncio.wait_for(first_run, 30)
        assert len(server.messages) == 1
        assert ids_in(server, tasks) == set(tasks)


async def test_partitions_revoked_before_any_record_are_released_too(tansu, unique_topic, tmp_path: Path) -> None:
    """A replica that joins takes half the notification partitions even if the first owner never read a record
    from them: the first must drop their state (it would otherwise keep timers and claim them in /readyz)."""
    topic = unique_topic("events")
    async with robot() as server:
        path = router_config(tmp_path, tansu, topic, server, {"group_by": ["imm.project"], "group_wait": "1s"})
        async with running(path) as first:
            await wait_until(lambda: len(first.owned_partitions) == 4, timeout=30, what="the first owning all 4")
            async with running(path) as second:
                await wait_until(
                    lambda: len(second.owned_partitions) == 2 and len(first.owned_partitions) == 2,
                    timeout=30,
                    what=lambda: f"2 each; first {first.owned_partitions}, second {second.owned_partitions}",
                )
                assert set(first.owned_partitions).isdisjoint(second.owned_partitions)
                assert first.metrics.owned_partitions._value.get() == 2


async def test_a_group_message_after_a_lost_state_write_is_sent_not_taken_for_a_duplicate(tmp_path: Path) -> None:
    """A revocation between a group's send and its state write leaves the changelog one message behind. When
    the same process owns the channel again, its next message for the group carries other alerts and must
    be sent: it was numbered like the one already sent, and delivery dropped it as a duplicate, settling (so
    losing) every alert in it."""
    async with robot() as server:
        (tmp_path / "rules").mkdir()
        target = {"channel": "robot", "template": "dingtalk/task-failed.md.j2", "group_by": ["imm.project"]}
        rule = {"name": "task-failed", "when": "imm.failed", "notify": [{**target, "group_wait": "0s"}]}
        (tmp_path / "rules" / "r.yaml").write_text(json.dumps({"rules": [rule]}))
        channels = {"robot": {"type": "dingtalk", "url": server.webhook_url("tok"), "secret": "sec"}}
        doc = {"rules_dir": "rules", "templates_dir": str(ROOT / "templates"), "channels": channels}
        (tmp_path / "router.yaml").write_text(json.dumps(doc))
        engine = load(tmp_path / "router.yaml")
        delivery = Delivery(engine, {}, Metrics())
        changelog = ChangelogRecorder()

        async def never(*_: Any) -> None:
            raise AssertionError("nothing is dead-lettered")

        manager = Manager(engine, delivery, Metrics(), changelog=changelog, dead_letter=never)
        settled: list[int] = []

        def handoff(i: int) -> Handoff:
            result = engine.route(decode_object(failed_event(i)))
            return Handoff(result.notifications[0], result.root, time.time(), SourceRecord("t", 0, i, None, None, ()))

        try:
            manager.assign(0, [])
            await manager.accept(0, handoff(1), lambda: settled.append(1))
            await wait_until(lambda: settled == [1], what="the first message sent")
            # The write after the send is lost: the changelog has the group as never sent.
            lost = [(k, v) for k, v in changelog.entries if not (k.startswith("b|") and v and v["messages"])]
            manager.revoke({0})
            manager.assign(0, lost)
            await manager.accept(0, handoff(2), lambda: settled.append(2))
            await wait_until(lambda: settled == [1, 2], what="the second alert settled")
        finally:
            await manager.close(1)
            await delivery.close(1)
        assert len(server.messages) == 2
        assert task_id(2) in texts(server)[1]


async def test_a_throttled_key_stays_throttled_when_its_channel_moves(tansu, unique_topic, tmp_path: Path) -> None:
    topic = unique_topic("events")
    async with robot() as server:
        path = router_config(tmp_path, tansu, topic, server, {"throttle": {"key": ["imm.project"], "for": "10s"}})
        first = Service(load(path), path)
        first_run = asyncio.create_task(first.run())
        try:
            await produce(tansu.bootstrap_servers, topic, [(failed("t-first"), [])])
            await server.wait_for(1, timeout=20)
            async with running(path) as second:
                first.stop()
                await asyncio.wait_for(first_run, 30)
                await wait_until(lambda: bool(second.owned_partitions) and second.idle, what="the takeover")
                await produce(tansu.bootstrap_servers, topic, [(failed(f"t-later-{i}"), []) for i in range(3)])
                await wait_until(
                    lambda: second.metrics.suppressed.labels("robot", "throttled")._value.get() == 3,
                    what="the new owner holding the key's alerts",
                )
                assert len(server.messages) == 1  # still throttled: nothing sent on its own
                await server.wait_for(2, timeout=30)
        finally:
            first.stop()
            await asyncio.wait_for(first_run, 30)
    assert "3 alerts held by the throttle" in texts(server)[1]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"notify": {"mute_time_intervals": ["nope"]}}, "unknown interval 'nope'"),
        ({"notify": {"group_wait": "5 minutes"}}, "is not a duration"),
        ({"notify": {"group_by": ["imm.project =="]}}, "group_by entry 'imm.project ==' is not valid JMESPath"),
        ({"inhibit_rules": [{"source_rules": ["nope"], "target_rules": ["task-failed"]}]}, "unknown rule 'nope'"),
        ({"notify": {"group_template": "group/missing.j2", "group_by": ["imm.project"]}}, "group_template"),
    ],
)
def test_bad_alert_management_config_names_file_and_line(tmp_path: Path, edit: dict[str, Any], expected: str) -> None:
    rules = write_rules(tmp_path, edit.get("notify", {}))
    config_file = tmp_path / "router.yaml"
    lines = [
        f"rules_dir: {rules}",
        f"templates_dir: {ROOT / 'templates'}",
        "channels:",
        "  robot: {type: dingtalk, url: 'http://127.0.0.1:1/robot/send?access_token=t'}",
    ]
    if "inhibit_rules" in edit:
        lines.append("inhibit_rules: " + json.dumps(edit["inhibit_rules"]))
    config_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as raised:
        load(config_file)
    message = str(raised.value)
    assert expected in message
    assert ("rules.yaml:1" in message) or ("router.yaml:5" in message)


# --- several router processes ---------------------------------------------------------------------


async def storm(tansu: TansuBroker, unique_topic, tmp_path: Path, *, kill_one: bool) -> None:
    topic = unique_topic("storm")
    async with robot() as server:  # enforces 20 messages a minute; beyond that 130101 for ten minutes
        notify = {"group_by": ["imm.project", "imm.error_code"], "group_wait": "2s", "group_interval": "20s"}
        path = router_config(tmp_path, tansu, topic, server, notify, log_level="DEBUG")
        tasks = [(f"s-{i}", f"proj-{i % 3}", ("InvalidArgument", "ResourceNotFound")[i % 2]) for i in range(2000)]
        routers = [await start_router(path, tmp_path / f"r{n}.log") for n in range(2)]
        try:
            await wait_until(
                lambda: all("owning" in (tmp_path / f"r{n}.log").read_text() for n in range(2)),
                timeout=60,
                what="both routers to own notification partitions",
            )
            await produce(tansu.bootstrap_servers, topic, [(failed(t, p, c), []) for t, p, c in tasks[:1000]])
            if kill_one:
                await server.wait_for(1, timeout=60)
                routers[0].kill()
                await routers[0].wait()
            await produce(tansu.bootstrap_servers, topic, [(failed(t, p, c), []) for t, p, c in tasks[1000:]])
            ids = [t for t, _, _ in tasks]
            await wait_until(
                lambda: len(ids_in(server, ids)) == len(ids),
                timeout=120,
                what=lambda: f"every task id; missing {sorted(set(ids) - ids_in(server, ids))[:20]}",
            )
        finally:
            for r in routers:
                if r.returncode is None:
                    r.send_signal(signal.SIGTERM)
            for r in routers:
                await asyncio.wait_for(r.wait(), 30)
    over_limit = server.errcodes.get(130101, 0)
    counts = [len(server.messages), over_limit]
    print(f"storm kill_one={kill_one}: 2000 events → {counts[0]} DingTalk messages, {over_limit} over-limit")
    assert over_limit == 0
    # 6 groups: one message at group_wait, then at most one per group_interval while the storm lasts.
    assert len(server.messages) <= 6 * 4


async def test_storm_through_two_router_processes(tansu, unique_topic, tmp_path: Path) -> None:
    await storm(tansu, unique_topic, tmp_path, kill_one=False)


async def test_storm_with_one_router_killed_mid_storm(tansu, unique_topic, tmp_path: Path) -> None:
    await storm(tansu, unique_topic, tmp_path, kill_one=True)


def now_plus(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def metric(session: aiohttp.ClientSession, port: int, name: str) -> float:
    """The sum of a metric's samples on a router's /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        text = await answer.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_a_silence_added_with_the_cli_applies_on_every_router_process_within_5s(
    tansu, unique_topic, tmp_path: Path
) -> None:
    from router.embedded import free_port

    topic = unique_topic("events")
    async with robot() as server:
        path = router_config(tmp_path, tansu, topic, server, {})
        ports = [free_port(), free_port()]
        configs = []
        for n, port in enumerate(ports):
            doc = json.loads(path.read_text())
            doc["http"] = {"enabled": True, "host": "127.0.0.1", "port": port}
            configs.append(tmp_path / f"router-{n}.yaml")
            configs[-1].write_text(json.dumps(doc))
        routers = [await start_router(c, tmp_path / f"r{n}.log") for n, c in enumerate(configs)]
        try:
            async with aiohttp.ClientSession() as session:

                async def on_all(name: str, value: float) -> bool:
                    try:
                        return all([await metric(session, p, name) == value for p in ports])
                    except aiohttp.ClientError:
                        return False

                # 4 partitions in the test config: each router owns some once both have joined.
                await wait_until_async(lambda: on_all("imm_router_owned_partitions", 2), 60, "both routers owning")
                await produce(tansu.bootstrap_servers, topic, [(failed("before", "staging"), [])])
                await server.wait_for(1, timeout=20)

                started = asyncio.get_running_loop().time()
                code, silence_id, err = await cli(
                    path, "add", "--match", "imm.project == 'staging'", "--for", "1h",
                    "--comment", "staging is noisy", "--author", "oncall",
                )  # fmt: skip
                assert code == 0, err
                added = asyncio.get_running_loop().time()
                await wait_until_async(lambda: on_all("imm_router_silences_active", 1), 5, "the silence everywhere")
                now = asyncio.get_running_loop().time()
                print(
                    f"silence applied on both routers {now - added:.2f}s after the CLI returned, "
                    f"{now - started:.2f}s after it was started"
                )
                await produce(
                    tansu.bootstrap_servers, topic, [(failed("silenced", "staging"), []), (failed("prod", "prod"), [])]
                )
                await server.wait_for(2, timeout=20)
                await wait_until_async(
                    lambda: sum_on(
                        session, ports, 'imm_router_notifications_suppressed_total{channel="robot",reason="silenced"}'
                    ),
                    20,
                    "the staging alert silenced",
                )

                code, _, err = await cli(path, "expire", silence_id.strip())
                assert code == 0, err
                await wait_until_async(
                    lambda: on_all("imm_router_silences_active", 0), 5, "the silence expired everywhere"
                )
                await produce(tansu.bootstrap_servers, topic, [(failed("after", "staging"), [])])
                await server.wait_for(3, timeout=20)
        finally:
            for r in routers:
                r.send_signal(signal.SIGTERM)
            for r in routers:
                await asyncio.wait_for(r.wait(), 30)
    assert ids_in(server, ["before", "silenced", "prod", "after"]) == {"before", "prod", "after"}


async def sum_on(session: aiohttp.ClientSession, ports: list[int], name: str) -> bool:
    try:
        return sum([await metric(session, p, name) for p in ports]) >= 1
    except aiohttp.ClientError:
        return False


async def wait_until_async(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_route_explain_says_what_would_be_silenced_inhibited_muted_and_grouped(
    tansu, unique_topic, tmp_path: Path
) -> None:
    topic = unique_topic("events")
    today = WEEKDAYS[datetime.now(UTC).weekday()]
    inhibit = [{"source_rules": ["moderation-block"], "target_rules": ["task-failed"], "equal": ["imm.project"]}]
    async with robot() as server:
        notify = {"group_by": ["imm.project"], "group_wait": "30s", "mute_time_intervals": ["never"]}
        intervals = [{"name": "never", "time_intervals": [{"weekdays": [today], "years": ["1999"]}]}]
        path = router_config(
            tmp_path, tansu, topic, server, notify, block_rule=True, inhibit_rules=inhibit, time_intervals=intervals
        )
        code, _, err = await cli(
            path, "add", "--match", "imm.project == 'quiet'", "--for", "1h", "--comment", "c", "--author", "a"
        )
        assert code == 0, err
    events = tmp_path / "events.jsonl"
    lines = [failed("t-quiet", "quiet"), failed("t-loud", "loud"), blocked("b-1", "blocked"), failed("t-2", "blocked")]
    events.write_bytes(b"\n".join(lines) + b"\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "route", "--explain", "--config", str(path), str(events),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    blocks = text.split("event ")[1:]
    assert "silenced: silence" in blocks[0] and "imm.project == 'quiet'" in blocks[0]
    assert "grouped by imm.project='loud'" in blocks[1]
    assert "matched moderation-block" in blocks[2] and "sent at once" in blocks[2]
    assert "inhibited: inhibited by rule moderation-block (imm.project='blocked')" in blocks[3]
