"""Delivery stages against the embedded servers: retry, dedup, rate limit and digests, circuit breaker,
shutdown, reload, secrets, and ``imm-router check --live``."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from router.channels.base import RateLimit, Scrubber
from router.channels.dingtalk import TRUNCATION_MARKER
from router.cli import main
from router.delivery.dedup import DedupMemory
from router.delivery.health import check_live, probe
from router.delivery.limiter import MARGIN_SECONDS, WINDOW_SECONDS, Slot, WindowLimiter
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.webhook import WebhookCapture
from router.metrics import Metrics
from tests.servers import DINGTALK_PLAIN_TOKEN, SMTP_PASSWORD, SMTP_USERNAME, TlsSmtpCapture
from tests.test_delivery_support import (
    ROOT,
    VirtualClock,
    counted,
    failed_event,
    make_engine,
    notifications,
    task_id,
    virtual_delivery,
)

pytestmark = pytest.mark.timeout(30)

WINDOW = WINDOW_SECONDS + MARGIN_SECONDS


def webhook_channel(server: WebhookCapture, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": f"{server.url}/hook", **extra}


def dingtalk_channel(server: FakeDingTalk, **extra: Any) -> dict[str, Any]:
    return {"type": "dingtalk", "url": server.webhook_url(DINGTALK_PLAIN_TOKEN), **extra}


def email_channel(server: TlsSmtpCapture, **extra: Any) -> dict[str, Any]:
    return {
        "type": "email",
        "host": "127.0.0.1",
        "port": server.port,
        "ca_file": str(server.ca_pem_path),
        "username": SMTP_USERNAME,
        "password": SMTP_PASSWORD,
        "from": "router@example.test",
        "to": ["oncall@example.test"],
        **extra,
    }


async def settle(delivery: Delivery, batch: list[Any]) -> list[str | BaseException]:
    return await asyncio.gather(*(delivery.deliver(n) for n in batch), return_exceptions=True)


# --- rate limiter ----------------------------------------------------------------------------------


def test_a_window_counts_from_when_each_request_finished() -> None:
    clock = VirtualClock()
    limiter = WindowLimiter(RateLimit(per_minute=3), clock=clock, sleep=clock.sleep)
    slots = [limiter.try_acquire() for _ in range(3)]
    assert all(slots) and limiter.try_acquire() is None
    clock.advance(5)  # a slow round trip: the server may have seen them as late as now
    for slot in slots:
        assert slot is not None
        slot.release()
    clock.advance(WINDOW - 0.01)
    assert limiter.try_acquire() is None
    clock.advance(0.01)
    assert limiter.try_acquire() is not None


def test_a_request_in_flight_holds_its_slot() -> None:
    clock = VirtualClock()
    limiter = WindowLimiter(RateLimit(per_minute=1), clock=clock, sleep=clock.sleep)
    slot = limiter.try_acquire()
    assert slot is not None
    clock.advance(1000)
    assert limiter.try_acquire() is None
    slot.cancel()  # never sent: frees at once
    assert limiter.try_acquire() is not None


async def test_acquire_waits_for_the_window_and_burst_spreads_requests() -> None:
    clock = VirtualClock()
    limiter = WindowLimiter(RateLimit(per_minute=6, burst=2), clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(8):
        slot = await limiter.acquire()
        starts.append(round(clock.elapsed, 2))
        slot.release()
    burst = WINDOW * 2 / 6  # 2 in any third of the window, 6 in the whole of it
    assert starts == [round(t, 2) for t in (0, 0, burst, burst, 2 * burst, 2 * burst, WINDOW, WINDOW)]


async def test_no_window_ever_holds_more_than_the_limit() -> None:
    """Concurrent users with random round trips: every request's window (as a server with a 60 s window
    could see it) holds at most N requests, whatever the latency."""
    clock = VirtualClock()
    limit = 5
    limiter = WindowLimiter(RateLimit(per_minute=limit), clock=clock, sleep=clock.sleep)
    done: list[tuple[float, float]] = []
    rng = random.Random(7)

    async def user() -> None:
        for _ in range(10):
            slot: Slot = await limiter.acquire()
            start = clock()
            await clock.sleep(rng.uniform(0, 20))  # the round trip
            slot.release()
            done.append((start, clock()))
            await clock.sleep(rng.uniform(0, 5))

    await asyncio.gather(*(user() for _ in range(8)))
    done.sort()
    for i, (start, _) in enumerate(done):
        # Requests reserved before this one that the server may have seen within 60 s of it.
        overlapping = [1 for s, finish in done[:i] if finish > start - WINDOW_SECONDS]
        assert len(overlapping) <= limit - 1
    assert len(done) == 80


# --- dedup -----------------------------------------------------------------------------------------


def test_dedup_memory_expires_and_stays_bounded() -> None:
    clock = VirtualClock()
    memory = DedupMemory(10, 3, clock=clock)
    for key in "abcd":
        memory.mark(key)
    assert len(memory) == 3 and not memory.seen("a") and memory.seen("b")
    clock.advance(10)
    assert not memory.seen("b")
    memory.mark("e")
    assert len(memory) <= 3


async def test_duplicates_are_suppressed_only_after_success(tmp_path: Path, webhook: WebhookCapture) -> None:
    engine = make_engine(tmp_path, {"hook": webhook_channel(webhook)}, service={"dedup_ttl_seconds": 5})
    clock = VirtualClock()
    metrics = Metrics()
    delivery = virtual_delivery(engine, clock, metrics)
    first, second = notifications(engine, [failed_event(1), failed_event(2)])
    webhook.set_statuses([400])
    try:
        with pytest.raises(DeliveryFailed):
            await delivery.deliver(first)
        assert await delivery.deliver(first) == "sent"  # a failure does not count as delivered
        assert await delivery.deliver(first) == "duplicate"
        # Two copies at once (a redelivered record): one request, the other waits for its outcome.
        assert sorted(await settle(delivery, [second, second])) == ["duplicate", "sent"]  # type: ignore[type-var]
        clock.advance(5)
        assert await delivery.deliver(first) == "sent"  # the TTL is over
    finally:
        await delivery.close(1)
    assert len(webhook.requests) == 4
    assert counted(metrics, "notifications_deduplicated", "hook") == 2


# --- retry -----------------------------------------------------------------------------------------


async def test_attempts_and_time_budget_bound_the_retries(tmp_path: Path) -> None:
    retry = {"attempts": 4, "initial_backoff_seconds": 1, "budget_seconds": 100}
    async with WebhookCapture(default_status=503) as server:
        breaker = {"failure_threshold": 10}
        engine = make_engine(tmp_path, {"hook": webhook_channel(server, retry=retry, circuit_breaker=breaker)})
        clock = VirtualClock()
        delivery = virtual_delivery(engine, clock)
        (notification,) = notifications(engine, [failed_event(1)])
        with pytest.raises(DeliveryFailed) as caught:
            await delivery.deliver(notification)
        assert caught.value.attempts == 4 and "HTTP 503" in caught.value.reason
        assert 0.5 + 1 + 2 <= clock.elapsed <= 1 + 2 + 4

        short_retry = {**retry, "budget_seconds": 2.5}
        short = make_engine(tmp_path, {"hook": webhook_channel(server, retry=short_retry, circuit_breaker=breaker)})
        delivery.swap_engine(short)
        with pytest.raises(DeliveryFailed) as caught:
            await delivery.deliver(notification)
        assert caught.value.attempts in (2, 3)  # the next backoff would overrun the 2.5 s budget
        await delivery.close(1)


async def test_an_unknown_channel_fails_permanently(tmp_path: Path, webhook: WebhookCapture) -> None:
    engine = make_engine(tmp_path, {"hook": webhook_channel(webhook)})
    (notification,) = notifications(engine, [failed_event(1)])
    other = tmp_path / "other"
    other.mkdir()
    delivery = Delivery(make_engine(other, {"elsewhere": webhook_channel(webhook)}), {}, Metrics())
    try:
        with pytest.raises(DeliveryFailed, match="not in the config"):
            await delivery.deliver(notification)
    finally:
        await delivery.close(1)


# --- circuit breaker -------------------------------------------------------------------------------


async def test_the_circuit_opens_fails_fast_and_closes_after_a_trial(tmp_path: Path) -> None:
    config = {"retry": {"attempts": 1}, "circuit_breaker": {"failure_threshold": 2, "reset_seconds": 30}}
    async with WebhookCapture(default_status=503) as server:
        engine = make_engine(tmp_path, {"hook": webhook_channel(server, **config)})
        clock = VirtualClock()
        metrics = Metrics()
        delivery = virtual_delivery(engine, clock, metrics)
        batch = notifications(engine, [failed_event(i) for i in range(4)])
        gauge = {"channel": "hook"}
        try:
            for notification in batch[:2]:
                with pytest.raises(DeliveryFailed, match="HTTP 503"):
                    await delivery.deliver(notification)
            assert metrics.registry.get_sample_value("imm_router_circuit_open", gauge) == 1
            with pytest.raises(DeliveryFailed) as caught:
                await delivery.deliver(batch[2])
            reason = "circuit open after 2 failed attempts in a row; last: hook: HTTP 503 (retriable)"
            assert caught.value.reason == reason
            assert caught.value.attempts == 0 and len(server.requests) == 2  # failed fast, nothing sent
            clock.advance(30)
            server.default_status = 200
            assert await delivery.deliver(batch[3]) == "sent"  # the half-open trial
            assert await delivery.deliver(batch[2]) == "sent"
        finally:
            await delivery.close(1)
        assert metrics.registry.get_sample_value("imm_router_circuit_open", gauge) == 0


async def test_a_stalled_channel_does_not_hold_up_the_others(
    tmp_path: Path, webhook: WebhookCapture, dingtalk: FakeDingTalk
) -> None:
    stalled = webhook_channel(
        webhook, timeout_seconds=5, retry={"attempts": 1}, circuit_breaker={"failure_threshold": 2}
    )
    engine = make_engine(tmp_path, {"stalled": stalled, "ding": dingtalk_channel(dingtalk)})
    delivery = Delivery(engine, {}, Metrics())
    batch = notifications(engine, [failed_event(i) for i in range(10)])
    webhook.hold()
    try:
        slow = [asyncio.ensure_future(delivery.deliver(n)) for n in batch if n.channel == "stalled"]
        fast = [n for n in batch if n.channel == "ding"]
        assert await asyncio.gather(*(delivery.deliver(n) for n in fast)) == ["sent"] * 10
        assert not all(task.done() for task in slow)  # the webhook still has not answered
        outcomes = await asyncio.gather(*slow, return_exceptions=True)
    finally:
        webhook.release()
        await delivery.close(1)
    assert all(isinstance(o, DeliveryFailed) for o in outcomes)
    reasons = [o.reason for o in outcomes if isinstance(o, DeliveryFailed)]
    assert sum(r.startswith("stalled: no answer within 5s") for r in reasons) <= 4  # one round at concurrency 4
    assert sum(r.startswith("circuit open") for r in reasons) >= 6


# --- rate limit and digests ------------------------------------------------------------------------


async def test_overflow_becomes_a_digest_email(tmp_path: Path, smtp_tls: TlsSmtpCapture) -> None:
    engine = make_engine(tmp_path, {"mail": email_channel(smtp_tls, rate_limit={"per_minute": 2})})
    clock = VirtualClock()
    metrics = Metrics()
    delivery = virtual_delivery(engine, clock, metrics)
    batch = notifications(engine, [failed_event(i) for i in range(6)])
    try:
        outcomes = await asyncio.gather(*(delivery.deliver(n, record_time=time.time()) for n in batch))
    finally:
        await delivery.close(1)
    assert sorted(outcomes) == ["digested"] * 4 + ["sent"] * 2
    latency = {"channel": "mail"}
    assert metrics.registry.get_sample_value("imm_router_delivery_latency_seconds_count", latency) == 6
    messages = await smtp_tls.wait_for(3)
    digest = next(m for m in messages if m.subject.startswith("[IMM DIGEST] 4 alerts"))
    _, html = digest.message.iter_parts()
    assert digest.message["X-IMM-Rule"] == "digest"
    for i in range(6):
        assert any(task_id(i) in m.message.get_body(("plain",)).get_content() for m in messages)  # type: ignore[union-attr]
    assert sum(task_id(i) in html.get_content() for i in range(6)) == 4
    assert WINDOW <= clock.elapsed < WINDOW + 1
    assert counted(metrics, "digests_sent", "mail") == 1
    assert counted(metrics, "notifications_digested", "mail") == 4
    assert counted(metrics, "notifications_sent", "mail") == 6


async def test_digests_are_split_so_their_text_is_never_cut(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    # Project names of 150 Chinese characters: 50 digest lines would be cut at DingTalk's size limit.
    ding = dingtalk_channel(dingtalk, rate_limit={"per_minute": 1})
    engine = make_engine(tmp_path, {"ding": ding})
    events = [failed_event(i, project="项目" * 75) for i in range(60)]
    clock = VirtualClock()
    delivery = virtual_delivery(engine, clock)
    try:
        outcomes = await settle(delivery, notifications(engine, events))
    finally:
        await delivery.close(1)
    assert outcomes.count("sent") == 1 and outcomes.count("digested") == 59
    texts = [r.payload["markdown"]["text"] for r in dingtalk.accepted]
    assert not any(text.endswith(TRUNCATION_MARKER) for text in texts)
    for event in events:
        assert any(event["id"] in text for text in texts)
    assert 3 <= len(texts) <= 4


async def test_a_broken_digest_template_fails_the_held_notifications(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "digest" / "broken.j2").write_text(
        "{% block title %}t{% endblock %}{% block text %}{{ alerts[0].no.such }}{% endblock %}"
    )
    ding = dingtalk_channel(dingtalk, rate_limit={"per_minute": 1}, digest_template="digest/broken.j2")
    engine = make_engine(tmp_path, {"ding": ding}, templates_dir=str(templates))
    delivery = virtual_delivery(engine, VirtualClock())
    try:
        outcomes = await settle(delivery, notifications(engine, [failed_event(i) for i in range(3)]))
    finally:
        await delivery.close(1)
    assert outcomes[0] == "sent"
    for failure in outcomes[1:]:
        assert isinstance(failure, DeliveryFailed) and failure.reason.startswith("digest template:")


async def test_a_reload_renders_held_alerts_with_the_new_digest_template(
    tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "digest" / "new.j2").write_text(
        "{% block title %}NEW DIGEST{% endblock %}"
        "{% block text %}NEW DIGEST {% for a in alerts %}{{ a.event_id }} {% endfor %}{% endblock %}"
    )
    ding = dingtalk_channel(dingtalk, rate_limit={"per_minute": 1})
    engine = make_engine(tmp_path, {"ding": ding}, templates_dir=str(templates))
    reloaded = make_engine(
        tmp_path, {"ding": {**ding, "digest_template": "digest/new.j2"}}, templates_dir=str(templates)
    )
    clock = VirtualClock()
    delivery = virtual_delivery(engine, clock)
    clock.pause()
    try:
        pending = asyncio.gather(
            *(delivery.deliver(n) for n in notifications(engine, [failed_event(i) for i in range(3)]))
        )
        await dingtalk.wait_for(1)  # the first went out; the others wait for the rate limit
        delivery.swap_engine(reloaded)
        clock.resume()
        assert await pending == ["sent", "digested", "digested"]
    finally:
        await delivery.close(1)
    digest = dingtalk.accepted[1].payload["markdown"]
    assert digest["title"] == "NEW DIGEST" and "evt-00001 evt-00002" in digest["text"]


# --- shutdown --------------------------------------------------------------------------------------


async def test_close_fails_what_cannot_be_sent_in_time(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    engine = make_engine(tmp_path, {"ding": dingtalk_channel(dingtalk, rate_limit={"per_minute": 1})})
    clock = VirtualClock()
    clock.pause()  # the rate limit's minute never passes
    delivery = virtual_delivery(engine, clock)
    first, second, third = notifications(engine, [failed_event(i) for i in range(3)])
    assert await delivery.deliver(first) == "sent"
    held = asyncio.ensure_future(delivery.deliver(second))
    await delivery.close(0.05)
    with pytest.raises(DeliveryFailed) as caught:
        await held
    assert caught.value.reason == "shutdown"
    with pytest.raises(DeliveryFailed, match="shutdown"):
        await delivery.deliver(third)
    assert len(dingtalk.requests) == 1


# --- secrets ---------------------------------------------------------------------------------------


async def test_secrets_never_reach_errors_logs_or_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dingtalk: FakeDingTalk, smtp_tls: TlsSmtpCapture
) -> None:
    token, real_secret, wrong_secret = "tok-LEAK-1a2b3c4d", "SEC-LEAK-real-5e6f", "SEC-LEAK-wrong-7a8b"
    password, hook_token, hmac_secret = "pw-LEAK-9c0d1e2f", "hook-LEAK-3a4b5c6d", "hmac-LEAK-7e8f9a0b"
    secrets = (token, real_secret, wrong_secret, password, hook_token, hmac_secret)
    dingtalk.add_robot(token, real_secret)
    dead_port = free_port()
    retry = {"attempts": 2, "initial_backoff_seconds": 0.1}

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # aiohttp's error for a bad status line quotes the whole request URL.
        await reader.readline()
        writer.write(b"HELLO\r\n\r\n")
        writer.close()

    garbage = await asyncio.start_server(not_http, "127.0.0.1", 0)
    garbage_port = garbage.sockets[0].getsockname()[1]
    async with garbage, WebhookCapture(default_status=500, response_body=f"echo {hook_token}") as hook:
        channels = {
            "ding-garbage": {
                "type": "dingtalk",
                "url": f"http://127.0.0.1:{garbage_port}/robot/send?access_token={token}",
                "secret": real_secret,
                "retry": {"attempts": 1},
            },
            "ding-bad-sign": {"type": "dingtalk", "url": dingtalk.webhook_url(token), "secret": wrong_secret},
            "ding-down": {
                "type": "dingtalk",
                "url": f"http://127.0.0.1:{dead_port}/robot/send?access_token={token}",
                "secret": real_secret,
                "retry": retry,
            },
            "mail": email_channel(smtp_tls, password=password),
            "hook": webhook_channel(hook, url=f"{hook.url}/h?token={hook_token}", hmac_secret=hmac_secret, retry=retry),
        }
        engine = make_engine(tmp_path, channels)
        metrics = Metrics()
        clock = VirtualClock()
        delivery = virtual_delivery(engine, clock, metrics)
        caplog.set_level(logging.DEBUG)
        try:
            outcomes = await settle(delivery, notifications(engine, [failed_event(1)]))
            checks = await asyncio.gather(*(probe(ch, 5, Scrubber(())) for ch in delivery.channels.values()))
        finally:
            await delivery.close(1)
    assert len(outcomes) == 5 and all(isinstance(o, DeliveryFailed) for o in outcomes)
    shown = [str(o) for o in outcomes] + [o.reason for o in outcomes if isinstance(o, DeliveryFailed)]
    shown += [detail for _, detail in checks]
    shown += [caplog.text, generate_latest(metrics.registry).decode()]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert "310000" in caplog.text and "535" in caplog.text and "HTTP 500: echo ***" in caplog.text
    assert "url='***&timestamp=" in caplog.text  # aiohttp's bad-status-line error quotes the URL: masked


def test_the_scrubber_masks_secrets_in_the_forms_libraries_print_them() -> None:
    scrub = Scrubber(["https://hooks.example/x?token=tok+en/123&v=1", "p@ss w0rd", ""])
    text = "POST https://hooks.example/x?token=tok+en/123&v=1 failed; tok+en/123 tok%2Ben%2F123; p%40ss+w0rd p@ss w0rd"
    assert scrub(text) == "POST *** failed; *** ***; *** ***"
    assert Scrubber([])("unchanged") == "unchanged"


# --- imm-router check --live -----------------------------------------------------------------------


async def test_check_live_reports_every_channel(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    smtp_tls: TlsSmtpCapture,
    dingtalk: FakeDingTalk,
    webhook: WebhookCapture,
    tansu: TansuBroker,
) -> None:
    channels = {
        "mail": email_channel(smtp_tls),
        "ding": dingtalk_channel(dingtalk),
        "topic": {"type": "kafka", "topic": "alerts"},
        "hook": webhook_channel(webhook),
    }
    engine = make_engine(tmp_path, channels, kafka={"bootstrap_servers": tansu.bootstrap_servers})
    assert await check_live(engine) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert any(line.startswith("  live mail (email): ok: SMTP 127.0.0.1") for line in lines)
    assert any(line.startswith("  live topic (kafka): ok: 1 broker(s)") for line in lines)
    # Reachable is all that can be known of these without sending a message: never called "ok".
    assert any(line.startswith("  live ding (dingtalk): reachable: ") and "not verified" in line for line in lines)
    assert any(line.startswith("  live hook (webhook): reachable: ") and "not verified" in line for line in lines)
    assert not webhook.requests and not dingtalk.requests  # checking sends nothing

    # The command itself, with the broker unreachable and the SMTP password wrong.
    broken = tmp_path / "broken"
    broken.mkdir()
    channels["mail"] = email_channel(smtp_tls, password="wrong-password")
    channels["ding"] = dingtalk_channel(dingtalk, secret="SEC-a-wrong-signing-secret")
    bad = {"bootstrap_servers": f"127.0.0.1:{free_port()}"}
    make_engine(broken, channels, kafka=bad)
    status = await asyncio.to_thread(main, ["check", "--live", "--config", str(broken / "router.yaml")])
    out = capsys.readouterr().out
    assert status == 1
    assert "live mail (email): FAILED: mail: authentication failed" in out and "wrong-password" not in out
    assert "live topic (kafka): FAILED: topic: KafkaConnectionError" in out
    assert "live ding (dingtalk): reachable: " in out and "live hook (webhook): reachable: " in out
    assert "SEC-a-wrong" not in out and "live ding (dingtalk): ok" not in out


async def test_close_interrupts_a_stalled_send_and_outside_cancellation_stays_cancellation(
    tmp_path: Path, webhook: WebhookCapture
) -> None:
    engine = make_engine(tmp_path, {"hook": webhook_channel(webhook, timeout_seconds=30)})
    first, second = notifications(engine, [failed_event(i) for i in range(2)])
    delivery = Delivery(engine, {}, Metrics())
    webhook.hold()
    try:
        stalled = asyncio.ensure_future(delivery.deliver(first))
        cancelled = asyncio.ensure_future(delivery.deliver(second))
        await webhook.wait_for(2)
        cancelled.cancel()  # the caller's own cancellation is not turned into anything else
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await delivery.close(0.05)
        with pytest.raises(DeliveryFailed) as caught:
            await stalled
    finally:
        webhook.release()
    assert caught.value.reason == "shutdown" and caught.value.attempts == 1
