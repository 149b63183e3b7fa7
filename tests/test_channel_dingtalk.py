"""The DingTalk channel against the fake robot API: signing, message types, errcode classification."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from router.channels import make_channel
from router.channels.base import Channel
from router.config import KafkaSettings
from router.embedded.dingtalk import FakeDingTalk
from router.errors import DeliveryError
from router.notification import Notification
from tests.servers import DINGTALK_PLAIN_TOKEN, DINGTALK_SECRET, DINGTALK_SIGNED_TOKEN
from tests.test_delivery_support import failed_event, make_engine, notifications, send_failing, task_id

pytestmark = pytest.mark.timeout(30)


def dingtalk_config(server: FakeDingTalk, token: str = DINGTALK_SIGNED_TOKEN, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"type": "dingtalk", "url": server.webhook_url(token), **extra}
    if token == DINGTALK_SIGNED_TOKEN and "secret" not in extra:
        config["secret"] = DINGTALK_SECRET
    return config


def setup(tmp_path: Path, server: FakeDingTalk, **config: Any) -> tuple[Channel, Notification]:
    token = config.pop("token", DINGTALK_SIGNED_TOKEN)
    engine = make_engine(tmp_path, {"ding": dingtalk_config(server, token, **config)})
    channel = make_channel("ding", engine.settings.channels["ding"], kafka_defaults=KafkaSettings())
    return channel, notifications(engine, [failed_event(1)])[0]


async def test_signed_markdown_with_mentions_is_accepted(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    channel, notification = setup(tmp_path, dingtalk, at_mobiles=["13800000000"], at_user_ids=["u42"])
    try:
        await channel.send(notification)
        await channel.send(notification)  # a fresh timestamp and signature each time
    finally:
        await channel.close()
    first, _ = await dingtalk.wait_for(2)
    assert first.query["timestamp"].isdigit() and first.query["sign"]
    assert abs(int(first.query["timestamp"]) / 1000 - time.time()) < 60
    payload = first.payload
    assert payload["msgtype"] == "markdown"
    assert task_id(1) in payload["markdown"]["text"]
    assert payload["at"] == {"atMobiles": ["13800000000"], "atUserIds": ["u42"], "isAtAll": False}
    assert "@13800000000" in payload["markdown"]["text"] and "@u42" in payload["markdown"]["text"]
    assert payload == notification.payload


@pytest.mark.parametrize("msgtype", ["text", "actionCard"])
async def test_text_and_action_card_without_signing(tmp_path: Path, dingtalk: FakeDingTalk, msgtype: str) -> None:
    channel, notification = setup(tmp_path, dingtalk, token=DINGTALK_PLAIN_TOKEN, msgtype=msgtype, at_all=True)
    try:
        await channel.send(notification)
    finally:
        await channel.close()
    (request,) = await dingtalk.wait_for(1)
    assert "sign" not in request.query
    # actionCard needs a button URL block, which the task-failed template has not: it falls back.
    assert request.msgtype == ("text" if msgtype == "text" else "markdown")
    assert request.payload["at"]["isAtAll"] is True


async def test_bad_signature_is_permanent_and_shows_errmsg_not_secrets(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    wrong_secret = "SEC-wrong-0123456789"
    channel, notification = setup(tmp_path, dingtalk, secret=wrong_secret)
    err = await send_failing(channel, notification)
    assert not err.retriable
    assert "310000" in str(err) and "sign not match" in str(err)
    for secret in (wrong_secret, DINGTALK_SIGNED_TOKEN, DINGTALK_SECRET):
        assert secret not in str(err)


async def test_timestamp_outside_the_window_is_refused(tmp_path: Path) -> None:
    # The server's clock is two hours ahead: our timestamp is outside DingTalk's one-hour window.
    robots: dict[str, str | None] = {DINGTALK_SIGNED_TOKEN: DINGTALK_SECRET}
    async with FakeDingTalk(robots, wall_clock=lambda: time.time() + 7200) as server:
        channel, notification = setup(tmp_path, server)
        try:
            with pytest.raises(DeliveryError, match="310000") as caught:
                await channel.send(notification)
        finally:
            await channel.close()
    assert not caught.value.retriable


@pytest.mark.parametrize(
    ("errcode", "retriable"),
    [(130101, True), (410100, True), (-1, True), (460101, False), (400102, False), (300001, False), (777, False)],
)
async def test_errcodes_decide(tmp_path: Path, dingtalk: FakeDingTalk, errcode: int, retriable: bool) -> None:
    channel, notification = setup(tmp_path, dingtalk)
    dingtalk.fail_next(1, errcode=errcode, errmsg=f"message for {errcode}")
    try:
        with pytest.raises(DeliveryError) as caught:
            await channel.send(notification)
        await channel.send(notification)  # the next one goes through on the same channel
    finally:
        await channel.close()
    assert caught.value.retriable is retriable
    assert f"errcode {errcode}: message for {errcode}" in str(caught.value)
    assert len(dingtalk.accepted) == 1


@pytest.mark.parametrize(("status", "retriable"), [(502, True), (429, True), (404, False)])
async def test_http_errors(tmp_path: Path, dingtalk: FakeDingTalk, status: int, retriable: bool) -> None:
    channel, notification = setup(tmp_path, dingtalk)
    dingtalk.fail_next(1, errcode=-1, http_status=status)
    try:
        with pytest.raises(DeliveryError, match=f"HTTP {status}") as caught:
            await channel.send(notification)
    finally:
        await channel.close()
    assert caught.value.retriable is retriable


async def test_unknown_token_is_permanent(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    channel, notification = setup(tmp_path, dingtalk, token="tok-nobody-knows")
    try:
        with pytest.raises(DeliveryError, match="300001") as caught:
            await channel.send(notification)
    finally:
        await channel.close()
    assert not caught.value.retriable and "tok-nobody-knows" not in str(caught.value)


async def test_unreachable_robot_is_retriable_and_health_says_so(tmp_path: Path) -> None:
    server = FakeDingTalk({DINGTALK_SIGNED_TOKEN: DINGTALK_SECRET})
    await server.start()
    await server.stop()  # a port nobody listens on any more
    channel, notification = setup(tmp_path, server)
    try:
        with pytest.raises(DeliveryError) as sending:
            await channel.send(notification)
        with pytest.raises(DeliveryError) as checking:
            await channel.health()
    finally:
        await channel.close()
    assert sending.value.retriable and checking.value.retriable
    for err in (sending.value, checking.value):
        assert DINGTALK_SIGNED_TOKEN not in str(err) and DINGTALK_SECRET not in str(err)


async def test_health_connects_without_posting(tmp_path: Path, dingtalk: FakeDingTalk) -> None:
    channel, _ = setup(tmp_path, dingtalk)
    try:
        assert "reachable" in await channel.health()
    finally:
        await channel.close()
    assert len(dingtalk.requests) == 0  # nothing counted against the robot's 20 a minute
