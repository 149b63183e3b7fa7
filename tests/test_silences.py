"""Silences against a real broker (Tansu): the CLI writes, running stores on the same topic apply them
within seconds, a store started later reads them all, malformed records are skipped with a warning,
the CLI refuses bad input, and the HTTP API enforces its token without ever showing it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from router.alerting.silences import Silence, SilenceStore
from router.alerting.topics import TopicFollower, TopicSpec, ensure_topics
from router.decode import decode
from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.engine import load
from router.ops import OpsServer
from router.rules import rule_root
from tests.conftest import ROOT
from tests.test_service import wait_until

pytestmark = pytest.mark.timeout(120)

ID = re.compile(r"^[0-9a-f]{32}$")
TOKEN = "silence-api-token-7f3a9c"


def silence_config(tmp_path: Path, bootstrap: str, silences_topic: str, http: dict[str, Any] | None = None) -> Path:
    """Two rules (task-failed → alerts and audit, moderation-block → alerts) and silences on ``silences_topic``."""
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    template = "kafka/alert.json.j2"
    (rules / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "task-failed",
                        "when": "imm.outcome == 'failed'",
                        "notify": [
                            {"channel": "alerts", "template": template},
                            {"channel": "audit", "template": template},
                        ],
                    },
                    {
                        "name": "moderation-block",
                        "when": "imm.moderation.suggestion == 'block'",
                        "notify": [{"channel": "alerts", "template": template}],
                    },
                ]
            }
        )
    )
    path = tmp_path / "router.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "rules_dir": str(rules),
                "templates_dir": str(ROOT / "templates"),
                "channels": {
                    "alerts": {"type": "kafka", "topic": f"{silences_topic}-alerts"},
                    "audit": {"type": "kafka", "topic": f"{silences_topic}-audit"},
                },
                "kafka": {"bootstrap_servers": bootstrap, "silences_topic": silences_topic},
                "http": http or {"enabled": False},
            }
        )
    )
    return path


def root(project: str) -> dict[str, Any]:
    """What a rule's `when` (and so a silence's match) sees for a failed task of ``project``."""
    payload = {
        "TaskType": "MediaConvert",
        "TaskId": f"task-{uuid.uuid4().hex[:8]}",
        "Status": "Failed",
        "Code": "InvalidArgument",
        "ProjectName": project,
    }
    return rule_root(decode(json.dumps(payload).encode(), source="test"))


async def cli(config: Path, *args: str) -> tuple[int, str, str]:
    """``imm-router silence ARGS --config CONFIG`` in a child process: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "silence",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_add(config: Path, *args: str) -> str:
    status, out, err = await cli(config, "add", *args)
    assert status == 0, err
    assert ID.match(out.strip()) and out.count("\n") == 1, f"stdout must be the id alone: {out!r}"
    return out.strip()


@asynccontextmanager
async def store_on(bootstrap: str, topic: str) -> AsyncIterator[SilenceStore]:
    """A started store that has read the topic up to its end."""
    store = SilenceStore({"bootstrap_servers": bootstrap}, topic)
    await store.start()
    try:
        await asyncio.wait_for(store.caught_up.wait(), 20)
        yield store
    finally:
        await store.stop()


async def wait_for_silence(
    store: SilenceStore, condition: Callable[[], bool], what: str, timeout: float = 5.0
) -> float:
    """Wait (at most 5 s: the promise to every replica) for a silence to apply; returns the time taken."""
    start = time.monotonic()
    await wait_until(condition, timeout=timeout, what=what)
    return time.monotonic() - start


def now() -> datetime:
    return datetime.now(UTC)


def silenced(
    store: SilenceStore, root: dict[str, Any], wanted: bool = True, rule: str = "task-failed", channel: str = "alerts"
) -> Callable[[], bool]:
    """A condition: an alert of ``rule`` to ``channel`` with this root is (or is not) silenced now."""
    return lambda: (store.silences.silenced_by(root, rule, channel, now()) is not None) == wanted


# --- the CLI writes, running stores apply ------------------------------------------------------------


async def test_cli_silence_applies_to_running_stores_within_5s_and_expire_lets_alerts_through(
    tansu: TansuBroker, unique_topic: Callable[[str], str], tmp_path: Path
) -> None:
    topic = unique_topic("silences")
    config = silence_config(tmp_path, tansu.bootstrap_servers, topic)
    staging, prod = root("staging"), root("prod")
    # Two stores: two replicas of the router.
    async with store_on(tansu.bootstrap_servers, topic) as a, store_on(tansu.bootstrap_servers, topic) as b:
        silence_id = await cli_add(
            config, "--match", "imm.project == 'staging'", "--for", "2h", "--comment", "load test", "--author", "ana"
        )
        for replica in (a, b):
            await wait_for_silence(replica, silenced(replica, staging), "the CLI's silence on both replicas")
            silence = replica.silences.silenced_by(staging, "task-failed", "alerts", now())
            assert silence is not None and silence.id == silence_id
            assert (silence.comment, silence.author, silence.state(now())) == ("load test", "ana", "active")
            assert timedelta(hours=1, minutes=59) < silence.ends_at - now() <= timedelta(hours=2)
            assert replica.silences.silenced_by(prod, "task-failed", "alerts", now()) is None
            assert replica.silences.silenced_by(staging, "moderation-block", "audit", now()) is not None

        status, out, err = await cli(config, "list")
        assert status == 0, err
        assert silence_id in out and "active" in out and "imm.project == 'staging'" in out and "ana" in out

        status, out, err = await cli(config, "expire", silence_id)
        assert status == 0, err
        for replica in (a, b):
            await wait_for_silence(replica, silenced(replica, staging, False), "the expiry on both replicas")
            expired = replica.silences.get(silence_id)
            assert expired is not None and expired.state(now()) == "expired"
        status, out, _ = await cli(config, "list")
        assert status == 0 and silence_id in out and "EXPIRED" in out  # listed for a day, marked


async def test_rule_and_channel_restrict_a_silence(
    tansu: TansuBroker, unique_topic: Callable[[str], str], tmp_path: Path
) -> None:
    topic = unique_topic("silences")
    config = silence_config(tmp_path, tansu.bootstrap_servers, topic)
    async with store_on(tansu.bootstrap_servers, topic) as store:
        common = ["--for", "1h", "--comment", "c", "--author", "a"]
        by_rule = await cli_add(config, "--match", "imm.project == 'p1'", "--rule", "task-failed", *common)
        by_channel = await cli_add(config, "--match", "imm.project == 'p2'", "--channel", "audit", *common)
        await wait_for_silence(
            store, lambda: store.silences.get(by_rule) and store.silences.get(by_channel), "both silences"
        )
        p1, p2, p3 = root("p1"), root("p2"), root("p3")

        def hit(r: dict[str, Any], rule: str, channel: str) -> str | None:
            silence = store.silences.silenced_by(r, rule, channel, now())
            return silence.id if silence else None

        assert hit(p1, "task-failed", "alerts") == by_rule
        assert hit(p1, "task-failed", "audit") == by_rule
        assert hit(p1, "moderation-block", "alerts") is None  # another rule
        assert hit(p2, "task-failed", "audit") == by_channel
        assert hit(p2, "moderation-block", "audit") == by_channel
        assert hit(p2, "task-failed", "alerts") is None  # another channel
        assert hit(p3, "task-failed", "audit") is None  # match false


async def test_overlapping_silences_expiring_one_keeps_the_alert_silenced(
    tansu: TansuBroker, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("silences")
    staging = root("staging")
    async with store_on(tansu.bootstrap_servers, topic) as a, store_on(tansu.bootstrap_servers, topic) as b:
        until = now() + timedelta(hours=1)
        first = await a.add("imm.project == 'staging'", ends_at=until, comment="first", author="ana")
        second = await a.add("imm.failed", ends_at=until, comment="second", author="bo")
        await wait_for_silence(b, lambda: b.silences.active_count(now()) == 2, "both silences on the other replica")
        await a.expire(first.id)
        await wait_for_silence(
            b, lambda: b.silences.active_count(now()) == 1, "the first silence's expiry on the other replica"
        )
        still = b.silences.silenced_by(staging, "task-failed", "alerts", now())
        assert still is not None and still.id == second.id
        await b.expire(second.id)  # from the other replica
        await wait_for_silence(
            a, lambda: a.silences.silenced_by(staging, "task-failed", "alerts", now()) is None, "no silence left"
        )


async def test_a_store_started_later_reads_every_silence(
    tansu: TansuBroker, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("silences")
    until = now() + timedelta(hours=1)
    async with store_on(tansu.bootstrap_servers, topic) as first:
        kept = await first.add("imm.project == 'a'", ends_at=until, comment="kept", author="ana")
        ended = await first.add("imm.project == 'b'", ends_at=until, comment="ended", author="ana")
        pending = await first.add(
            "imm.project == 'c'", starts_at=until, ends_at=until + timedelta(hours=1), comment="later", author="ana"
        )
        await first.expire(ended.id)
    # A restart (or a new replica): everything comes back from the topic.
    async with store_on(tansu.bootstrap_servers, topic) as later:
        assert later.silences.get(kept.id) == kept
        assert [(s.id, s.state(now())) for s in later.silences.listing(now())] == [
            (kept.id, "active"),
            (pending.id, "pending"),
            (ended.id, "expired"),
        ]
        assert later.silences.silenced_by(root("a"), "task-failed", "alerts", now()) == kept
        assert later.silences.silenced_by(root("b"), "task-failed", "alerts", now()) is None
        assert later.silences.silenced_by(root("c"), "task-failed", "alerts", now()) is None  # not started yet
        assert later.silences.silenced_by(root("c"), "task-failed", "alerts", until + timedelta(minutes=1))


async def test_malformed_records_are_skipped_with_a_warning_naming_topic_and_offset(
    tansu: TansuBroker, unique_topic: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="router.alerting.silences")
    topic = unique_topic("silences")
    await ensure_topics({"bootstrap_servers": tansu.bootstrap_servers}, {topic: TopicSpec(1, compact=True)}, 1)
    moment = now()

    def record(match: str, **changes: Any) -> tuple[bytes, bytes]:
        silence = Silence(
            id=uuid.uuid4().hex,
            match=match,
            starts_at=moment,
            ends_at=moment + timedelta(hours=1),
            comment="c",
            author="a",
            created_at=moment,
            updated_at=moment,
        )
        doc = {**silence.model_dump(mode="json"), **changes}
        return silence.id.encode(), json.dumps(doc).encode()

    good_key, good_value = record("imm.project == 'good'")
    no_author = record("imm.project == 'x'")
    records = [
        (b"0" * 32, b"{not json"),
        record("imm.project == "),  # match does not compile
        (no_author[0], json.dumps({k: v for k, v in json.loads(no_author[1]).items() if k != "author"}).encode()),
        record("imm.project == 'x'", ends_at="tomorrow"),
        (good_key, good_value),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap_servers, acks="all")
    await producer.start()
    try:
        offsets = [(await producer.send_and_wait(topic, key=k, value=v)).offset for k, v in records]
        async with store_on(tansu.bootstrap_servers, topic) as store:
            assert len(store.silences) == 1
            assert store.silences.silenced_by(root("good"), "task-failed", "alerts", now()) is not None
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            for offset, problem in zip(
                offsets[:4], ["Invalid JSON", "not valid JMESPath", "author: Field required", "ends_at"], strict=True
            ):
                assert any(w.startswith(f"{topic}/0@{offset}: ") and problem in w for w in warnings), (
                    offset,
                    problem,
                    warnings,
                )
            # Still following after the bad ones: a later good record applies.
            later_key, later_value = record("imm.project == 'later'")
            await producer.send_and_wait(topic, key=later_key, value=later_value)
            await wait_for_silence(store, lambda: store.silences.get(later_key.decode()) is not None, "a later silence")
            # A tombstone deletes.
            await producer.send_and_wait(topic, key=good_key, value=None)
            await wait_for_silence(store, lambda: store.silences.get(good_key.decode()) is None, "the tombstone")
    finally:
        await producer.stop()


# --- the follower itself -------------------------------------------------------------------------


async def test_follower_waits_for_a_broker_that_is_down_and_a_topic_not_there_yet(
    tansu_factory: Callable[..., Any], unique_topic: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="router.alerting.topics")
    port = free_port()
    topic = unique_topic("followed")
    seen: list[bytes] = []

    def on_record(record: Any) -> None:
        if record.value == b"boom":
            raise ValueError("cannot apply this one")
        seen.append(record.value)

    follower = TopicFollower({"bootstrap_servers": f"127.0.0.1:{port}"}, topic, on_record)
    await follower.start()
    try:
        await wait_until(lambda: "following topic" in caplog.text, what="a warning about the broker being down")
        broker: TansuBroker = await tansu_factory(port=port)
        await wait_until(lambda: "does not exist yet" in caplog.text, what="a warning about the missing topic")
        assert not follower.caught_up.is_set()
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            await ensure_topics({"bootstrap_servers": broker.bootstrap_servers}, {topic: TopicSpec(2, False)}, 1)
            for value, partition in ((b"one", 0), (b"boom", 1), (b"two", 1)):
                await producer.send_and_wait(topic, value=value, partition=partition)
        finally:
            await producer.stop()
        await wait_until(lambda: sorted(seen) == [b"one", b"two"], timeout=15, what="records of both partitions")
        assert follower.caught_up.is_set()
        assert f"{topic}/1@0: skipping a record that could not be applied" in caplog.text
    finally:
        await follower.stop()


# --- CLI refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (
            ["--match", "imm.project == ", "--for", "1h"],
            2,
            ["--match is not valid JMESPath", "\n    imm.project == \n"],
        ),
        (["--match", "imm.failed", "--rule", "nope", "--for", "1h"], 2, ["'nope'", "moderation-block, task-failed"]),
        (["--match", "imm.failed", "--channel", "pager", "--for", "1h"], 2, ["'pager'", "alerts, audit"]),
        (["--match", "imm.failed", "--until", "2020-01-01T00:00:00+08:00"], 2, ["--until", "in the past"]),
        (["--match", "imm.failed", "--until", "2999-01-01T00:00:00"], 2, ["--until", "no time zone"]),
        (["--match", "imm.failed", "--for", "2 hours"], 2, ["--for", "not a duration"]),
    ],
    ids=["bad-match", "unknown-rule", "unknown-channel", "until-past", "until-naive", "bad-for"],
)
async def test_cli_refuses_bad_input(
    tansu: TansuBroker,
    unique_topic: Callable[[str], str],
    tmp_path: Path,
    args: list[str],
    status: int,
    expected: list[str],
) -> None:
    topic = unique_topic("silences")
    config = silence_config(tmp_path, tansu.bootstrap_servers, topic)
    code, out, err = await cli(config, "add", *args, "--comment", "c", "--author", "a")
    assert code == status, err
    assert out == ""
    for text in expected:
        assert text in err, err
    if "JMESPath" in err:
        assert re.search(r"\n    imm\.project == \n    \s*\^", err), err  # the caret under the problem
    async with store_on(tansu.bootstrap_servers, topic) as store:
        assert len(store.silences) == 0  # nothing written


async def test_cli_notes_a_duplicate_and_refuses_an_unknown_id(
    tansu: TansuBroker, unique_topic: Callable[[str], str], tmp_path: Path
) -> None:
    config = silence_config(tmp_path, tansu.bootstrap_servers, unique_topic("silences"))
    args = ["--rule", "task-failed", "--for", "1h", "--comment", "c", "--author", "a"]
    first = await cli_add(config, "--match", "imm.project=='x'", *args)
    status, out, err = await cli(config, "add", "--match", "imm.project == 'x'", *args)  # same, spaced differently
    assert status == 0 and ID.match(out.strip()) and out.strip() != first
    assert f"note: silence {first}" in err
    status, out, err = await cli(
        config, "add", "--match", "imm.project == 'x'", "--for", "1h", "--comment", "c", "--author", "a"
    )
    assert status == 0 and "note:" not in err  # no --rule: not the same silence
    status, out, err = await cli(config, "expire", "0" * 32)
    assert status == 1 and f"no silence with id {'0' * 32!r}" in err


# --- HTTP API -------------------------------------------------------------------------------------


@asynccontextmanager
async def api(config: Path, topic: str, bootstrap: str) -> AsyncIterator[tuple[str, SilenceStore]]:
    """The ops server of a service whose silence store follows ``topic``: (base URL, store)."""
    async with store_on(bootstrap, topic) as store:
        service = SimpleNamespace(silences=store, engine=load(config), metrics=None)
        server = OpsServer(service, "127.0.0.1", 0)  # type: ignore[arg-type]
        await server.start()
        try:
            yield f"http://127.0.0.1:{server.port}/api/v1/silences", store
        finally:
            await server.stop()


class Client:
    """Records every response, so a test can check none of them shows the token."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.seen: list[str] = []

    async def call(self, method: str, url: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": token} if token is not None else {}
        async with self.session.request(method, url, headers=headers, **kwargs) as response:
            text = await response.text()
            self.seen += [text, str(dict(response.headers))]
            return response.status, json.loads(text)


async def test_api_refuses_writes_without_a_configured_token(
    tansu: TansuBroker, unique_topic: Callable[[str], str], tmp_path: Path
) -> None:
    topic = unique_topic("silences")
    config = silence_config(tmp_path, tansu.bootstrap_servers, topic)
    async with api(config, topic, tansu.bootstrap_servers) as (url, store), aiohttp.ClientSession() as session:
        client = Client(session)
        body = {"match": "imm.failed", "for": "1h", "comment": "c", "author": "a"}
        status, doc = await client.call("POST", url, f"Bearer {TOKEN}", json=body)
        assert status == 403
        assert "disabled" in doc["error"] and "http.api_token" in doc["error"]
        status, doc = await client.call("DELETE", f"{url}/{'0' * 32}", f"Bearer {TOKEN}")
        assert status == 403
        assert await client.call("GET", url) == (200, [])
        assert len(store.silences) == 0


async def test_api_token_guards_writes_and_never_shows(
    tansu: TansuBroker,
    unique_topic: Callable[[str], str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SILENCE_API_TOKEN", TOKEN)
    topic = unique_topic("silences")
    config = silence_config(tmp_path, tansu.bootstrap_servers, topic, http={"api_token": "${SILENCE_API_TOKEN}"})
    body = {"match": "imm.project == 'staging'", "rule": "task-failed", "for": "2h", "comment": "c", "author": "ana"}
    async with (
        api(config, topic, tansu.bootstrap_servers) as (url, store),
        store_on(tansu.bootstrap_servers, topic) as replica,
        aiohttp.ClientSession() as session,
    ):
        client = Client(session)
        for auth in (None, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, f"Basic {TOKEN}", "Bearer "):
            status, doc = await client.call("POST", url, auth, json=body)
            assert status == 401, auth
            assert "Authorization: Bearer" in doc["error"]
        assert len(store.silences) == 0

        good = f"Bearer {TOKEN}"
        status, doc = await client.call("POST", url, good, json=body)
        assert status == 201 and ID.match(doc["id"]) and set(doc) == {"id"}
        silence_id = doc["id"]
        status, listed = await client.call("GET", url)  # no token needed to read
        assert status == 200
        assert [(s["id"], s["state"], s["rule"], s["author"]) for s in listed] == [
            (silence_id, "active", "task-failed", "ana")
        ]
        await wait_for_silence(
            replica,
            lambda: replica.silences.silenced_by(root("staging"), "task-failed", "alerts", now()) is not None,
            "the API's silence on another replica",
        )
        assert replica.silences.silenced_by(root("staging"), "moderation-block", "alerts", now()) is None

        for bad, problem in [
            (b"{oops", "not JSON"),
            ({**body, "comment": None}, "comment must be a string"),
            ({k: v for k, v in body.items() if k != "author"}, "author is required"),
            ({**body, "ends_at": "2999-01-01T00:00:00+00:00"}, "either `for`"),
            ({**body, "for": None, "ends_at": "2999-01-01T00:00:00"}, "no time zone"),
            ({**body, "for": "soon"}, "not a duration"),
            ({**body, "rule": "nope"}, "unknown rule 'nope'"),
            ({**body, "match": "imm.project =="}, "not valid JMESPath"),
            ({**body, "silence": "all"}, "unknown field(s) silence"),
        ]:
            kwargs: dict[str, Any] = {"data": bad} if isinstance(bad, bytes) else {"json": bad}
            status, doc = await client.call("POST", url, good, **kwargs)
            assert status == 400 and problem in doc["error"], (bad, doc)

        assert (await client.call("DELETE", f"{url}/{silence_id}", f"Bearer {TOKEN}x"))[0] == 401
        assert (await client.call("DELETE", f"{url}/{'0' * 32}", good))[0] == 404
        status, doc = await client.call("DELETE", f"{url}/{silence_id}", good)
        assert status == 200 and doc["id"] == silence_id and doc["state"] == "expired"
        await wait_for_silence(
            replica,
            lambda: replica.silences.silenced_by(root("staging"), "task-failed", "alerts", now()) is None,
            "the expiry on another replica",
        )
        status, listed = await client.call("GET", url)
        assert [(s["id"], s["state"]) for s in listed] == [(silence_id, "expired")]

    assert client.seen and all(TOKEN not in text for text in client.seen)
    assert caplog.records and TOKEN not in caplog.text
    assert f"silence {silence_id} added" in caplog.text  # the log was captured: the check above means something


async def test_api_answers_503_until_the_store_exists(tmp_path: Path) -> None:
    config = silence_config(tmp_path, "127.0.0.1:1", "unused", http={"api_token": TOKEN})
    service = SimpleNamespace(silences=None, engine=load(config), metrics=None)
    server = OpsServer(service, "127.0.0.1", 0)  # type: ignore[arg-type]
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/api/v1/silences"
            async with session.get(url) as response:
                assert response.status == 503
                assert "connecting to Kafka" in (await response.json())["error"]
            body = {"match": "imm.failed", "for": "1h", "comment": "c", "author": "a"}
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 503
    finally:
        await server.stop()
