"""The email channel against aiosmtpd: STARTTLS with a throw-away CA, AUTH, MIME, errors, reuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from router.channels import email as email_channel
from router.channels import make_channel
from router.channels.base import Channel
from router.config import KafkaSettings
from router.embedded.smtp import SmtpCapture
from router.errors import DeliveryError
from router.notification import Notification
from tests.servers import SMTP_PASSWORD, SMTP_USERNAME, TlsSmtpCapture
from tests.test_delivery_support import failed_event, make_engine, notifications, send_all, send_failing, task_id

pytestmark = pytest.mark.timeout(30)

RECIPIENTS = ["oncall@example.test", "值班 <duty@example.test>"]


def email_config(server: SmtpCapture, **extra: Any) -> dict[str, Any]:
    tls = "implicit" if server.implicit_tls else "starttls" if server.tls_context else "none"
    config: dict[str, Any] = {
        "type": "email",
        "host": "127.0.0.1",
        "port": server.port,
        "tls": tls,
        "from": "IMM 路由器 <router@example.test>",
        "to": RECIPIENTS,
        "timeout_seconds": 5,
    }
    if isinstance(server, TlsSmtpCapture):
        config |= {"ca_file": str(server.ca_pem_path), "username": SMTP_USERNAME, "password": SMTP_PASSWORD}
    return config | extra


def setup(tmp_path: Path, server: SmtpCapture, count: int = 1, **extra: Any) -> tuple[Channel, list[Notification]]:
    engine = make_engine(tmp_path, {"mail": email_config(server, **extra)})
    channel = make_channel("mail", engine.settings.channels["mail"], kafka_defaults=KafkaSettings())
    return channel, notifications(engine, [failed_event(i) for i in range(count)])


class PeerRecordingSmtp(TlsSmtpCapture):
    """Remembers which client connection (peer address) carried each message."""

    peers: list[Any]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.peers.append(session.peer)
        return await super().handle_DATA(server, session, envelope)


async def test_starttls_auth_multipart_utf8_headers(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    channel, (notification,) = setup(tmp_path, smtp_tls)
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (received,) = await smtp_tls.wait_for(1)
    assert received.tls and received.username == SMTP_USERNAME
    assert received.rcpt_tos == ("oncall@example.test", "duty@example.test")
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert task_id(0) in text.get_content() and task_id(0) in html.get_content()
    assert "源文件无法解码" in text.get_content()
    assert received.subject == notification.payload["subject"] and "任务失败" in received.subject
    assert str(message["From"]) == "IMM 路由器 <router@example.test>"
    assert message["X-IMM-Event-Id"] == notification.event_id == "evt-00000"
    assert message["X-IMM-Rule"] == "task-failed"
    assert message["Message-ID"].endswith("@example.test>") and message["Date"]


async def test_one_connection_carries_many_messages(tmp_path: Path, ca: trustme.CA, ca_pem_path: Path) -> None:
    async with PeerRecordingSmtp(ca, ca_pem_path, auth=(SMTP_USERNAME, SMTP_PASSWORD)) as server:
        server.peers = []
        channel, batch = setup(tmp_path, server, count=5)
        await send_all(channel, batch)
        await server.wait_for(5)
    assert len(set(server.peers)) == 1


async def test_a_long_idle_connection_is_not_reused(
    tmp_path: Path, ca: trustme.CA, ca_pem_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(email_channel, "MAX_IDLE_SECONDS", 0.0)  # every connection counts as idle too long
    async with PeerRecordingSmtp(ca, ca_pem_path, auth=(SMTP_USERNAME, SMTP_PASSWORD)) as server:
        server.peers = []
        channel, batch = setup(tmp_path, server, count=2)
        await send_all(channel, batch)
        await server.wait_for(2)
    assert len(set(server.peers)) == 2


async def test_implicit_tls(tmp_path: Path, smtps: TlsSmtpCapture) -> None:
    channel, (notification,) = setup(tmp_path, smtps)
    try:
        assert "EHLO and NOOP" in await channel.health()
        await channel.send(notification)
    finally:
        await channel.close()
    (received,) = await smtps.wait_for(1)
    assert received.tls and received.username == SMTP_USERNAME


async def test_plain_smtp_without_auth_and_text_only(tmp_path: Path, smtp_plain: SmtpCapture) -> None:
    channel, (notification,) = setup(tmp_path, smtp_plain)
    text_only = dataclasses.replace(notification, payload={**notification.payload, "html": None})
    try:
        await channel.send(text_only)
    finally:
        await channel.close()
    (received,) = await smtp_plain.wait_for(1)
    assert not received.tls and received.username is None
    assert received.message.get_content_type() == "text/plain"


async def test_wrong_password_is_a_clear_permanent_error(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    wrong = "not-the-Pa55word"
    channel, (notification,) = setup(tmp_path, smtp_tls, password=wrong)
    err = await send_failing(channel, notification)
    assert not err.retriable
    assert f"authentication failed for {SMTP_USERNAME}: 535" in str(err)
    assert wrong not in str(err) and SMTP_PASSWORD not in str(err)
    assert smtp_tls.auth_failures and not smtp_tls.messages  # aiosmtplib tries PLAIN, then LOGIN


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_untrusted_certificate_is_a_clear_permanent_error(
    tmp_path: Path, smtp_tls: TlsSmtpCapture, smtps: TlsSmtpCapture, tls: str
) -> None:
    server = smtp_tls if tls == "starttls" else smtps
    # No ca_file: the system's CAs do not know the test CA, and verification is on by default.
    channel, (notification,) = setup(tmp_path, server, ca_file=None)
    try:
        with pytest.raises(DeliveryError) as caught:
            await channel.send(notification)
        with pytest.raises(DeliveryError) as checking:
            await channel.health()
    finally:
        await channel.close()
    for err in (caught.value, checking.value):
        assert not err.retriable
        assert "TLS certificate not trusted" in str(err) and "set ca_file" in str(err)
    assert not server.messages


async def test_verify_off_accepts_the_untrusted_certificate(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    channel, (notification,) = setup(tmp_path, smtp_tls, ca_file=None, verify=False)
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    await smtp_tls.wait_for(1)


@pytest.mark.parametrize(("code", "retriable"), [(451, True), (421, True), (550, False), (554, False)])
async def test_smtp_codes_decide(tmp_path: Path, smtp_tls: TlsSmtpCapture, code: int, retriable: bool) -> None:
    channel, (notification,) = setup(tmp_path, smtp_tls)
    smtp_tls.fail_next(1, code)
    try:
        with pytest.raises(DeliveryError) as caught:
            await channel.send(notification)
        await channel.send(notification)  # and the channel recovers for the next message
    finally:
        await channel.close()
    assert caught.value.retriable is retriable
    assert str(code) in str(caught.value)
    assert len(smtp_tls.rejected) == 1 and len(await smtp_tls.wait_for(1)) == 1


async def test_refused_connection_is_retriable(tmp_path: Path, smtp_plain: SmtpCapture) -> None:
    channel, (notification,) = setup(tmp_path, smtp_plain)
    await smtp_plain.stop()
    err = await send_failing(channel, notification)
    assert err.retriable


async def test_a_dropped_idle_connection_is_replaced(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    channel, (first, second) = setup(tmp_path, smtp_tls, count=2)
    try:
        await channel.send(first)
        await smtp_tls.stop()  # closes the server side of the pooled connection
        await smtp_tls.start()
        await channel.send(second)
    finally:
        await channel.close()
    assert len(await smtp_tls.wait_for(2)) == 2


async def test_a_newline_in_an_event_id_is_encoded_in_the_header(tmp_path: Path, smtp_plain: SmtpCapture) -> None:
    engine = make_engine(tmp_path, {"mail": email_config(smtp_plain)})
    channel = make_channel("mail", engine.settings.channels["mail"], kafka_defaults=KafkaSettings())
    batch = notifications(engine, [failed_event(1, event_id="evt-1\r\nBcc: victim@evil.test")])
    await send_all(channel, batch)
    (received,) = await smtp_plain.wait_for(1)
    assert received.message["X-IMM-Event-Id"] == "evt-1%0D%0ABcc: victim@evil.test"
    assert received.message["Bcc"] is None and received.rcpt_tos == ("oncall@example.test", "duty@example.test")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def email_channel_with_clock(tmp_path: Path, server: SmtpCapture, **extra: Any) -> tuple[Any, Clock, Notification]:
    engine = make_engine(tmp_path, {"mail": email_config(server, **extra)})
    clock = Clock()
    channel = email_channel.EmailChannel("mail", engine.settings.channels["mail"], clock=clock)
    return channel, clock, notifications(engine, [failed_event(1)])[0]


async def test_health_checks_do_not_log_in_every_interval(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    channel, clock, _ = email_channel_with_clock(tmp_path, smtp_tls)
    try:
        first = await channel.health()
        for _ in range(5):
            clock.now += 30
            later = await channel.health()
        assert smtp_tls.logins == 1
        assert f"AUTH as {SMTP_USERNAME})" in first and f"AUTH as {SMTP_USERNAME} 150s ago" in later
        clock.now += email_channel.LOGIN_CHECK_SECONDS
        await channel.health()
        assert smtp_tls.logins == 2  # once an hour it checks the login again
    finally:
        await channel.close()


async def test_after_a_failed_login_nothing_logs_in_until_the_backoff_passes(
    tmp_path: Path, smtp_tls: TlsSmtpCapture
) -> None:
    channel, clock, notification = email_channel_with_clock(tmp_path, smtp_tls, password="wrong-Pa55word")
    try:
        with pytest.raises(DeliveryError, match="authentication failed"):
            await channel.health()
        tried = smtp_tls.auth_failures
        assert tried >= 1
        for _ in range(3):
            clock.now += 30
            with pytest.raises(DeliveryError, match="no login is tried for another") as caught:
                await channel.health()
            assert not caught.value.retriable and "wrong-Pa55word" not in str(caught.value)
            with pytest.raises(DeliveryError, match="no login is tried for another"):
                await channel.send(notification)
        assert smtp_tls.auth_failures == tried  # nothing went to the server meanwhile
        clock.now += email_channel.AUTH_BACKOFF_SECONDS
        with pytest.raises(DeliveryError, match="authentication failed"):
            await channel.health()
        assert smtp_tls.auth_failures == 2 * tried
        clock.now += email_channel.AUTH_BACKOFF_SECONDS + 1  # the backoff doubled
        with pytest.raises(DeliveryError, match="no login is tried for another"):
            await channel.send(notification)
        assert smtp_tls.auth_failures == 2 * tried and not smtp_tls.messages
    finally:
        await channel.close()
