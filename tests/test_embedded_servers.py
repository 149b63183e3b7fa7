"""The embedded servers behave like the real ones in the ways the router depends on."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from router.embedded import Recorder
from router.embedded.broker import MotoS3, TansuBroker
from router.embedded.dingtalk import FakeDingTalk, dingtalk_sign, dingtalk_signature
from router.embedded.smtp import SmtpCapture
from router.embedded.webhook import WebhookCapture
from tests.servers import (
    DINGTALK_PLAIN_TOKEN,
    DINGTALK_SECRET,
    DINGTALK_SIGNED_TOKEN,
    SMTP_PASSWORD,
    SMTP_USERNAME,
    TlsSmtpCapture,
)

pytestmark = pytest.mark.timeout(30)


def _mail(subject: str = "IMM alert", to: str = "ops@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "router@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Körper: the job failed.\n")
    return msg


# --- Recorder ------------------------------------------------------------------------------------


async def test_recorder_wakes_waiter_from_another_thread() -> None:
    rec: Recorder[int] = Recorder()
    waiter = asyncio.create_task(rec.wait_for(2, timeout=5))
    await asyncio.to_thread(rec.add, 1)
    await asyncio.to_thread(rec.add, 2)
    assert await waiter == [1, 2]


async def test_recorder_timeout_says_what_arrived() -> None:
    rec: Recorder[str] = Recorder()
    rec.add("only-one")
    with pytest.raises(TimeoutError, match=r"expected 2 item.*got 1"):
        await rec.wait_for(2, timeout=0.01)


# --- SMTP ----------------------------------------------------------------------------------------


async def test_smtp_starttls_auth_delivers(smtp_tls: TlsSmtpCapture) -> None:
    await aiosmtplib.send(
        _mail("disk full"),
        hostname=smtp_tls.host,
        port=smtp_tls.port,
        start_tls=True,
        username=smtp_tls.username,
        password=smtp_tls.password,
        tls_context=smtp_tls.client_ssl_context(),
    )
    [got] = await smtp_tls.wait_for(1)
    assert got.subject == "disk full"
    assert got.mail_from == "router@example.test"
    assert got.rcpt_tos == ("ops@example.test",)
    assert got.tls and got.username == SMTP_USERNAME
    assert "Körper" in got.message.get_content()
    assert got.response == "250 OK"


async def test_smtp_ca_pem_file_is_usable(smtp_tls: TlsSmtpCapture) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_tls.ca_pem_path))
    async with aiosmtplib.SMTP(hostname=smtp_tls.host, port=smtp_tls.port, tls_context=ctx) as client:
        await client.login(SMTP_USERNAME, SMTP_PASSWORD)
        await client.send_message(_mail("1"))
        await client.send_message(_mail("2"))
    assert [m.subject for m in await smtp_tls.wait_for(2)] == ["1", "2"]


async def test_smtp_wrong_password_refused(smtp_tls: TlsSmtpCapture) -> None:
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await aiosmtplib.send(
            _mail(),
            hostname=smtp_tls.host,
            port=smtp_tls.port,
            start_tls=True,
            username=SMTP_USERNAME,
            password="wrong",
            tls_context=smtp_tls.client_ssl_context(),
        )
    assert err.value.code == 535
    assert smtp_tls.auth_failures >= 1  # aiosmtplib may try PLAIN, then LOGIN
    assert smtp_tls.messages == []


async def test_smtp_untrusted_certificate_fails(smtp_tls: TlsSmtpCapture) -> None:
    untrusting = ssl.create_default_context()
    trustme.CA().configure_trust(untrusting)  # some other CA
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)):
        await aiosmtplib.send(
            _mail(),
            hostname=smtp_tls.host,
            port=smtp_tls.port,
            start_tls=True,
            username=SMTP_USERNAME,
            password=SMTP_PASSWORD,
            tls_context=untrusting,
        )
    assert smtp_tls.messages == []


async def test_smtp_requires_starttls_and_auth(smtp_tls: TlsSmtpCapture) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException) as err:
        await aiosmtplib.send(_mail(), hostname=smtp_tls.host, port=smtp_tls.port, start_tls=False)
    assert err.value.code == 530  # must issue STARTTLS first
    with pytest.raises(aiosmtplib.SMTPResponseException) as err:
        await aiosmtplib.send(
            _mail(),
            hostname=smtp_tls.host,
            port=smtp_tls.port,
            start_tls=True,
            tls_context=smtp_tls.client_ssl_context(),
        )
    assert err.value.code == 530  # authentication required
    assert smtp_tls.messages == []


async def test_smtp_fail_next_answers_retriable_then_permanent(smtp_plain: SmtpCapture) -> None:
    smtp_plain.fail_next(1, 451)
    smtp_plain.fail_next(1, 550)
    port = smtp_plain.port
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(_mail("a"), hostname="127.0.0.1", port=port)
    assert err.value.code == 451
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await aiosmtplib.send(_mail("b"), hostname="127.0.0.1", port=port)
    assert err.value.code == 550
    await aiosmtplib.send(_mail("c"), hostname="127.0.0.1", port=port)
    assert [m.subject for m in await smtp_plain.wait_for(1)] == ["c"]
    assert [(m.subject, m.response[:3]) for m in smtp_plain.rejected] == [("a", "451"), ("b", "550")]
    assert not smtp_plain.messages[0].tls


async def test_smtps_implicit_tls_and_outbox(ca: trustme.CA, ca_pem_path: Path, outbox: Path) -> None:
    async with TlsSmtpCapture(
        ca, ca_pem_path, implicit_tls=True, auth=(SMTP_USERNAME, SMTP_PASSWORD), outbox=outbox
    ) as server:
        assert server.url.startswith("smtps://")
        await aiosmtplib.send(
            _mail("over smtps"),
            hostname=server.host,
            port=server.port,
            use_tls=True,
            username=SMTP_USERNAME,
            password=SMTP_PASSWORD,
            tls_context=server.client_ssl_context(),
        )
        [got] = await server.wait_for(1)
    assert got.tls and got.username == SMTP_USERNAME
    [eml] = sorted(outbox.glob("*.eml"))
    assert eml.read_bytes() == got.data
    assert b"Subject: over smtps" in got.data


async def test_smtp_wait_for_from_concurrent_sender(smtp_plain: SmtpCapture) -> None:
    async def send_later() -> None:
        for i in range(3):
            await aiosmtplib.send(_mail(str(i)), hostname=smtp_plain.host, port=smtp_plain.port)

    sender = asyncio.create_task(send_later())
    got = await smtp_plain.wait_for(3)
    await sender
    assert [m.subject for m in got] == ["0", "1", "2"]


async def test_smtp_blocking_client_in_a_thread(smtp_plain: SmtpCapture) -> None:
    # The server runs in this loop: a blocking client must not run on it, but may run in a thread.
    def send() -> None:
        with smtplib.SMTP(smtp_plain.host, smtp_plain.port) as client:
            client.send_message(_mail("from smtplib"))

    await asyncio.to_thread(send)
    assert [m.subject for m in await smtp_plain.wait_for(1)] == ["from smtplib"]


async def test_smtp_stop_closes_open_connections() -> None:
    server = SmtpCapture()
    await server.start()
    client = aiosmtplib.SMTP(hostname=server.host, port=server.port)
    await client.connect()
    await asyncio.wait_for(server.stop(), 2)
    with pytest.raises(aiosmtplib.SMTPException):
        await client.noop()


# --- DingTalk ------------------------------------------------------------------------------------


def _signed_url(server: FakeDingTalk, ts_ms: int | None = None, sign: str | None = None) -> str:
    ts_ms = int(time.time() * 1000) if ts_ms is None else ts_ms
    sign = dingtalk_sign(DINGTALK_SECRET, ts_ms) if sign is None else sign
    return f"{server.webhook_url(DINGTALK_SIGNED_TOKEN)}&timestamp={ts_ms}&sign={sign}"


async def _post(url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text) if resp.status == 200 else text


TEXT = {"msgtype": "text", "text": {"content": "IMM job failed"}}


async def test_dingtalk_accepts_signed_and_unsigned(dingtalk: FakeDingTalk) -> None:
    assert await _post(_signed_url(dingtalk), TEXT) == (200, {"errcode": 0, "errmsg": "ok"})
    md = {"msgtype": "markdown", "markdown": {"title": "t", "text": "# x"}}
    assert (await _post(dingtalk.webhook_url(DINGTALK_PLAIN_TOKEN), md))[1]["errcode"] == 0
    got = await dingtalk.wait_for(2)
    assert [r.token for r in got] == [DINGTALK_SIGNED_TOKEN, DINGTALK_PLAIN_TOKEN]
    assert dingtalk.messages == [TEXT, md]
    assert dingtalk.errcodes == {0: 2}


@pytest.mark.parametrize(
    ("ts_offset_s", "sign", "errmsg"),
    [
        (0, "d3Jvbmc%3D", "sign not match"),  # bad signature
        (0, "", "sign not match"),  # missing signature
        (-3601, None, "invalid timestamp"),  # stale
        (3601, None, "invalid timestamp"),  # from the future
    ],
)
async def test_dingtalk_rejects_bad_signature_and_timestamps(
    dingtalk: FakeDingTalk, ts_offset_s: int, sign: str | None, errmsg: str
) -> None:
    ts = int((time.time() + ts_offset_s) * 1000)
    status, body = await _post(_signed_url(dingtalk, ts, sign), TEXT)
    assert (status, body["errcode"], body["errmsg"]) == (200, 310000, errmsg)
    assert dingtalk.accepted.items == [] and dingtalk.errcodes[310000] == 1


async def test_dingtalk_timestamp_within_the_hour_and_unencoded_sign(dingtalk: FakeDingTalk) -> None:
    ts = int((time.time() - 3500) * 1000)
    assert (await _post(_signed_url(dingtalk, ts), TEXT))[1]["errcode"] == 0
    # A client that forgets to URL-encode the signature fails whenever it contains "+".
    while "+" not in dingtalk_signature(DINGTALK_SECRET, ts):
        ts += 1
    _, body = await _post(_signed_url(dingtalk, ts, dingtalk_signature(DINGTALK_SECRET, ts)), TEXT)
    assert body["errcode"] == 310000


async def test_dingtalk_unknown_token_size_type_and_json(dingtalk: FakeDingTalk) -> None:
    assert (await _post(dingtalk.webhook_url("nope"), TEXT))[1]["errcode"] == 300001
    plain = dingtalk.webhook_url(DINGTALK_PLAIN_TOKEN)
    big = {"msgtype": "text", "text": {"content": "x" * 20_000}}
    assert (await _post(plain, big))[1]["errcode"] == 460101
    assert (await _post(plain, {"msgtype": "image"}))[1]["errcode"] == 400105
    assert (await _post(plain, b"not json"))[1]["errcode"] == 40035
    assert dingtalk.errcodes == {300001: 1, 460101: 1, 400105: 1, 40035: 1}
    assert len(dingtalk.requests) == 4 and len(dingtalk.accepted) == 0


async def test_dingtalk_rate_limit_then_throttle() -> None:
    now = [1000.0]
    async with FakeDingTalk({"t": None}, clock=lambda: now[0]) as server:
        url = server.webhook_url("t")
        for _ in range(20):
            assert (await _post(url, TEXT))[1]["errcode"] == 0
        assert (await _post(url, TEXT))[1]["errcode"] == 130101  # the 21st in a minute
        now[0] += 61  # the window has passed, but the robot is throttled for 10 minutes
        assert (await _post(url, TEXT))[1]["errcode"] == 130101
        assert server.throttled("t")
        now[0] += 600
        assert (await _post(url, TEXT))[1]["errcode"] == 0
        assert server.errcodes == {0: 21, 130101: 2}


async def test_dingtalk_sliding_window_with_short_settings() -> None:
    now = [0.0]
    async with FakeDingTalk({"t": None}, rate_limit=2, rate_window=1, throttle_for=0, clock=lambda: now[0]) as s:
        url = s.webhook_url("t")
        codes = []
        for step in (0, 0.5, 0.6, 0.5, 0.1):  # sent at t = 0, 0.5, 1.1, 1.6, 1.7
            now[0] += step
            codes.append((await _post(url, TEXT))[1]["errcode"])
        assert codes == [0, 0, 0, 0, 130101]


async def test_dingtalk_forced_failures_and_outbox(outbox: Path) -> None:
    async with FakeDingTalk({"t": None}, outbox=outbox) as server:
        server.fail_next(1, -1)
        server.fail_next(1, http_status=500)
        url = server.webhook_url("t")
        assert await _post(url, TEXT) == (200, {"errcode": -1, "errmsg": "系统繁忙"})
        assert (await _post(url, TEXT))[0] == 500
        assert (await _post(url, TEXT))[1]["errcode"] == 0
        await server.wait_for(1)
        assert [r.http_status for r in await server.wait_for_requests(3)] == [200, 500, 200]
    [path] = sorted(outbox.glob("*.json"))
    assert json.loads(path.read_text()) == {
        "token": "t",
        "received_at": server.accepted[0].received_at,
        "message": TEXT,
    }


# --- Webhook -------------------------------------------------------------------------------------


async def test_webhook_scripted_statuses_and_records(outbox: Path) -> None:
    async with WebhookCapture([503, 503], outbox=outbox) as hook:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                async with session.post(f"{hook.url}/alerts?x=1", json={"n": i}, headers={"X-Id": "7"}) as r:
                    statuses.append(r.status)
        got = await hook.wait_for(3)
    assert statuses == [503, 503, 200]
    assert [(r.method, r.path, r.query, r.status, r.json()) for r in got] == [
        ("POST", "/alerts", {"x": "1"}, 503, {"n": 0}),
        ("POST", "/alerts", {"x": "1"}, 503, {"n": 1}),
        ("POST", "/alerts", {"x": "1"}, 200, {"n": 2}),
    ]
    assert got[0].headers["x-id"] == "7"
    assert got[0].headers["content-type"] == "application/json"
    files = sorted(outbox.glob("*.json"))
    assert [json.loads(p.read_text())["body"] for p in files] == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_webhook_fixture(webhook: WebhookCapture) -> None:
    webhook.set_statuses([500])
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{webhook.url}/x", data=b"\xff") as r:
            assert r.status == 500
        async with session.get(webhook.url) as r:
            assert r.status == 200
    got = await webhook.wait_for(2)
    assert [(r.method, r.path, r.body) for r in got] == [("PUT", "/x", b"\xff"), ("GET", "/", b"")]


# --- Tansu ---------------------------------------------------------------------------------------


def _consumer(bootstrap: str, topic: str, group: str | None = "g") -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        session_timeout_ms=1000,
        heartbeat_interval_ms=200,
    )


async def test_tansu_produce_consume_round_trip(tansu: TansuBroker, unique_topic: Callable[[str], str]) -> None:
    topic = unique_topic("events")
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap_servers)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(
                topic, f"v{i}".encode(), key=b"k", headers=[("ce_type", b"imm"), ("bin", b"\x00\xff")]
            )
    finally:
        await producer.stop()
    consumer = _consumer(tansu.bootstrap_servers, topic)
    await consumer.start()
    try:
        got = [await asyncio.wait_for(consumer.getone(), 10) for _ in range(3)]
    finally:
        await consumer.stop()
    assert [m.value for m in got] == [b"v0", b"v1", b"v2"]
    assert got[0].headers == (("ce_type", b"imm"), ("bin", b"\x00\xff"))


async def test_tansu_kill_and_restart_on_same_port(
    tansu_factory: Callable[..., Awaitable[TansuBroker]], tmp_path: Path
) -> None:
    broker = await tansu_factory()
    port, pid = broker.port, broker.pid
    assert broker.log_path.parent == tmp_path and "tansu" in broker.log_path.read_text()
    broker.kill()
    await broker.restart()
    assert broker.port == port and broker.pid != pid and broker.running
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    await producer.send_and_wait("after-restart", b"x")
    await producer.stop()
    old = pid
    assert old is not None
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)  # reaped, no orphan


async def test_tansu_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = TansuBroker(log_path=tmp_path / "tansu.log")
    async with broker:
        pid = broker.pid
        assert pid is not None and broker.running
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_ctrl_c_in_a_terminal_does_not_reach_the_broker(tansu: TansuBroker) -> None:
    """A terminal's Ctrl-C signals its whole foreground process group; the broker is in a group of its own,
    so the demo can still read its summary from it after Ctrl-C, and stops it itself."""
    assert tansu.pid is not None
    assert os.getpgid(tansu.pid) != os.getpgid(0)


async def test_tansu_s3_storage_survives_restart(
    moto_s3: MotoS3, tansu_factory: Callable[..., Awaitable[TansuBroker]]
) -> None:
    broker = await tansu_factory(storage_engine="s3://tansu/", env=moto_s3.broker_env())
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    await producer.send_and_wait("durable", b"kept", partition=0)
    await producer.stop()
    broker.kill()
    await broker.restart()
    consumer = _consumer(broker.bootstrap_servers, "durable", group=None)
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), 10)
    finally:
        await consumer.stop()
    assert msg.value == b"kept"
