"""The webhook channel against WebhookCapture: JSON body, headers, HMAC, status classification."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from router.channels import make_channel
from router.channels.base import Channel
from router.config import KafkaSettings, load_settings
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.embedded.webhook import WebhookCapture
from router.engine import Engine
from router.errors import ConfigError
from router.metrics import Metrics
from router.notification import Notification
from tests.test_delivery_support import (
    VirtualClock,
    counted,
    failed_event,
    make_engine,
    notifications,
    send_failing,
    task_id,
    virtual_delivery,
)

pytestmark = pytest.mark.timeout(30)

HMAC_SECRET = "hmac-s3cret-for-tests"
URL_TOKEN = "hook-token-0123456789"


def webhook_engine(tmp_path: Path, server: WebhookCapture, **extra: Any) -> Engine:
    config = {
        "type": "webhook",
        "url": f"{server.url}/hooks/imm?token={URL_TOKEN}",
        "headers": {"X-Team": "媒体处理"},
        "hmac_secret": HMAC_SECRET,
        "retry": {"attempts": 3, "initial_backoff_seconds": 0.5},
        **extra,
    }
    return make_engine(tmp_path, {"hook": config})


def setup(tmp_path: Path, server: WebhookCapture, **extra: Any) -> tuple[Channel, Notification]:
    engine = webhook_engine(tmp_path, server, **extra)
    channel = make_channel("hook", engine.settings.channels["hook"], kafka_defaults=KafkaSettings())
    return channel, notifications(engine, [failed_event(7)])[0]


async def test_json_body_headers_and_a_verifiable_signature(tmp_path: Path, webhook: WebhookCapture) -> None:
    channel, notification = setup(tmp_path, webhook)
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (request,) = await webhook.wait_for(1)
    assert request.method == "POST" and request.path == "/hooks/imm" and request.query == {"token": URL_TOKEN}
    assert request.json() == notification.payload["body"]
    assert request.json()["imm"]["task_id"] == task_id(7)
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["x-team"] == "媒体处理"
    assert headers["x-imm-event-id"] == "evt-00007" and headers["x-imm-rule"] == "task-failed"
    expected = hmac.new(HMAC_SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert headers["x-imm-signature"] == f"sha256={expected}"


async def test_no_signature_without_a_secret(tmp_path: Path, webhook: WebhookCapture) -> None:
    channel, notification = setup(tmp_path, webhook, hmac_secret=None)
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (request,) = await webhook.wait_for(1)
    assert "x-imm-signature" not in request.headers


@pytest.mark.parametrize(
    ("status", "retriable"), [(503, True), (500, True), (429, True), (408, True), (400, False), (404, False)]
)
async def test_statuses_decide(tmp_path: Path, webhook: WebhookCapture, status: int, retriable: bool) -> None:
    channel, notification = setup(tmp_path, webhook)
    webhook.set_statuses([status])
    webhook.response_body = f"answer with {URL_TOKEN}"  # a careless server echoing the token
    err = await send_failing(channel, notification)
    assert err.retriable is retriable
    assert f"HTTP {status}" in str(err) and URL_TOKEN not in str(err)


async def test_retry_on_503_then_success(tmp_path: Path, webhook: WebhookCapture) -> None:
    engine = webhook_engine(tmp_path, webhook)
    webhook.set_statuses([503, 503])
    clock = VirtualClock()
    metrics = Metrics()
    delivery = virtual_delivery(engine, clock, metrics)
    (notification,) = notifications(engine, [failed_event(1)])
    try:
        assert await delivery.deliver(notification) == "sent"
    finally:
        await delivery.close(1)
    assert [r.status for r in webhook.requests] == [503, 503, 200]
    assert 0.5 <= clock.elapsed <= 0.5 + 1.0  # backoff 0.5 s then 1 s, with jitter in [50%, 100%]
    assert counted(metrics, "notifications_retried", "hook") == 2
    assert counted(metrics, "notifications_failed", "hook") == 2
    assert counted(metrics, "notifications_sent", "hook") == 1


async def test_400_is_given_up_at_once(tmp_path: Path, webhook: WebhookCapture) -> None:
    engine = webhook_engine(tmp_path, webhook)
    webhook.set_statuses([400])
    delivery = Delivery(engine, {}, Metrics())
    (notification,) = notifications(engine, [failed_event(1)])
    try:
        with pytest.raises(DeliveryFailed) as caught:
            await delivery.deliver(notification)
    finally:
        await delivery.close(1)
    assert caught.value.attempts == 1 and "HTTP 400" in caught.value.reason
    assert caught.value.notification is notification
    assert len(webhook.requests) == 1


async def test_health_connects_without_a_request(tmp_path: Path, webhook: WebhookCapture) -> None:
    channel, _ = setup(tmp_path, webhook)
    try:
        assert "reachable" in await channel.health()
    finally:
        await channel.close()
    assert not webhook.requests


def test_an_invalid_url_is_a_config_error_without_the_url(tmp_path: Path) -> None:
    config = {"type": "webhook", "url": f"not a url {URL_TOKEN}"}
    (tmp_path / "rules").mkdir()
    (tmp_path / "router.yaml").write_text(json.dumps({"channels": {"hook": config}}))
    # Refused when the config is loaded (check, run and reload), not when the channel is built.
    with pytest.raises(ConfigError, match=r"channels\.hook\.url: not a usable http") as caught:
        load_settings(tmp_path / "router.yaml")
    assert URL_TOKEN not in str(caught.value)


INJECTED_ID = "evt-1\r\nX-Injected: yes"


async def test_a_newline_in_an_event_id_is_encoded_not_sent_as_a_header(
    tmp_path: Path, webhook: WebhookCapture
) -> None:
    engine = webhook_engine(tmp_path, webhook)
    channel = make_channel("hook", engine.settings.channels["hook"], kafka_defaults=KafkaSettings())
    (notification,) = notifications(engine, [failed_event(1, event_id=INJECTED_ID)])
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (request,) = await webhook.wait_for(1)
    assert request.headers["x-imm-event-id"] == "evt-1%0D%0AX-Injected: yes"
    assert "x-injected" not in request.headers


async def test_a_request_that_can_never_be_sent_is_permanent_and_does_not_open_the_circuit(
    tmp_path: Path, webhook: WebhookCapture
) -> None:
    engine = webhook_engine(tmp_path, webhook, circuit_breaker={"failure_threshold": 1})
    metrics = Metrics()
    delivery = Delivery(engine, {}, metrics)
    good, other = notifications(engine, [failed_event(1), failed_event(2)])
    payload = {**other.payload, "headers": {**other.payload["headers"], "X-Bad": "a\r\nb"}}
    unsendable = dataclasses.replace(other, payload=payload)
    try:
        with pytest.raises(DeliveryFailed) as caught:
            await delivery.deliver(unsendable)
        assert caught.value.attempts == 1 and "cannot be sent" in caught.value.reason
        assert "permanent" in caught.value.reason
        assert await delivery.deliver(good) == "sent"
    finally:
        await delivery.close(1)
    assert [r.json()["imm"]["task_id"] for r in webhook.requests] == [task_id(1)]
    assert counted(metrics, "notifications_failed", "hook") == 1


async def test_configured_header_values_are_sent_but_never_shown(tmp_path: Path, webhook: WebhookCapture) -> None:
    bearer = "Bearer hdr-s3cret-0123456789"
    channel, notification = setup(tmp_path, webhook, headers={"Authorization": bearer})
    assert bearer not in json.dumps(notification.payload)
    webhook.set_statuses([400])
    webhook.response_body = f"bad token {bearer}"
    err = await send_failing(channel, notification)
    (request,) = await webhook.wait_for(1)
    assert request.headers["authorization"] == bearer
    assert "hdr-s3cret" not in str(err) and "HTTP 400" in str(err)
