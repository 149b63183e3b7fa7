"""The Alertmanager channel against real Prometheus Alertmanagers (Debian's 0.25): alerts read back via
GET /api/v2/alerts, an HA pair, silences, TLS with basic auth; bearer token and 5xx against a capture."""

from __future__ import annotations

import logging
import shutil
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from router.channels import make_channel
from router.channels.alertmanager import BasicAuth
from router.channels.base import Channel
from router.config import KafkaSettings
from router.embedded.alertmanager import Alertmanager
from router.embedded.broker import TansuBroker
from router.embedded.webhook import WebhookCapture
from router.errors import ConfigError
from router.notification import Notification
from tests.test_delivery_support import (
    ROOT,
    counted,
    failed_event,
    make_engine,
    notifications,
    send_all,
    send_failing,
    task_id,
)
from tests.test_service import config, failed_task, kafka_only_rules, produce, running, wait_until

pytestmark = pytest.mark.timeout(60)

AmFactory = Callable[..., Awaitable[Alertmanager]]
AM_USER = "router"
AM_PASSWORD = "am-Pa55word"
# bcrypt of AM_PASSWORD (Alertmanager's web config takes hashes only).
AM_PASSWORD_HASH = "$2b$04$SXOoQM1zBBTHlaOTMo5YvezeA22gcM0U4kGCVGs6bWSn0e7GVEZ.y"
BEARER = "bearer-tok-0123456789"


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def setup(tmp_path: Path, url: Any, *, project: str = "test_project", **config: Any) -> tuple[Channel, Notification]:
    engine = make_engine(tmp_path, {"am": {"type": "alertmanager", "url": url, **config}})
    channel = make_channel("am", engine.settings.channels["am"], kafka_defaults=KafkaSettings())
    return channel, notifications(engine, [failed_event(1, project=project, time=now_iso())])[0]


async def test_alert_reaches_both_members_of_an_ha_pair(tmp_path: Path, alertmanager_factory: AmFactory) -> None:
    first, second = await alertmanager_factory(), await alertmanager_factory()
    channel, notification = setup(tmp_path, [first.url, second.url + "/"], resolve_after="2h")
    await send_all(channel, [notification])
    for server in (first, second):
        (alert,) = await server.alerts()
        assert alert["labels"] == {
            "alertname": "task-failed",
            "severity": "critical",
            "project": "test_project",
            "task_type": "MediaConvert",
            "error_code": "InvalidParameter",
            "region": "cn-hangzhou",
        }
        assert task_id(1) in alert["annotations"]["summary"]
        assert "源文件无法解码" in alert["annotations"]["description"]
        starts = datetime.fromisoformat(alert["startsAt"])
        assert abs((starts - datetime.now(UTC)).total_seconds()) < 60  # the event's time
        assert datetime.fromisoformat(alert["endsAt"]) - starts == timedelta(hours=2)
        assert alert["status"]["state"] == "active"


async def test_template_blocks_and_rule_labels(tmp_path: Path, alertmanager_factory: AmFactory) -> None:
    server = await alertmanager_factory()
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "alertmanager" / "alert.j2").write_text(
        '{% extends "alertmanager/base.j2" %}\n'
        '{% block links %}{{ {"runbook_url": "https://runbooks.example/imm", "none": none} | json }}{% endblock %}\n'
        "{% block generator_url %}https://console.example/imm/{{ imm.project }}{% endblock %}\n"
    )
    labels = {"team.name": "imm", "severity": "page", "empty": ""}
    engine = make_engine(
        tmp_path, {"am": {"type": "alertmanager", "url": server.url}}, rule_labels=labels, templates_dir=str(templates)
    )
    channel = make_channel("am", engine.settings.channels["am"], kafka_defaults=KafkaSettings())
    await send_all(channel, notifications(engine, [failed_event(1, time=now_iso())]))
    (alert,) = await server.alerts()
    # The rule's labels win over the defaults; names become valid label names, empty values go.
    assert alert["labels"]["team_name"] == "imm" and alert["labels"]["severity"] == "page"
    assert "empty" not in alert["labels"] and alert["labels"]["alertname"] == "task-failed"
    assert alert["annotations"]["runbook_url"] == "https://runbooks.example/imm"
    assert "none" not in alert["annotations"]
    assert alert["generatorURL"] == "https://console.example/imm/test_project"


async def test_imm_events_through_the_router_service_appear_in_alertmanager(
    tmp_path: Path, alertmanager_factory: AmFactory, tansu: TansuBroker, unique_topic: Any
) -> None:
    server = await alertmanager_factory()
    topic = unique_topic("events")
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=kafka_only_rules(tmp_path, "alertmanager/alert.j2", "am"),
        channels={"am": {"type": "alertmanager", "url": server.url}},
    )
    async with running(path) as service:
        await produce(tansu.bootstrap_servers, topic, [(failed_task(f"am-{i}"), []) for i in range(2)])
        await wait_until(lambda: counted(service.metrics, "notifications_sent", "am") == 2, what="2 alerts sent")
    # Equal labels are one alert in Alertmanager: the second event refreshed the first.
    (alert,) = await server.alerts(alertname="any-failure")
    assert alert["labels"]["project"] == "p" and alert["labels"]["error_code"] == "InvalidArgument"
    assert alert["status"]["state"] == "active" and "am-" in alert["annotations"]["summary"]


async def test_silence_in_alertmanager_suppresses_staging(tmp_path: Path, alertmanager_factory: AmFactory) -> None:
    server = await alertmanager_factory()
    now = datetime.now(UTC)
    silence = {
        "matchers": [{"name": "project", "value": "staging", "isRegex": False, "isEqual": True}],
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(hours=1)).isoformat(),
        "createdBy": "test",
        "comment": "staging is noisy",
    }
    silence_id = (await server.api("POST", "/api/v2/silences", silence))["silenceID"]
    engine = make_engine(tmp_path, {"am": {"type": "alertmanager", "url": server.url}})
    channel = make_channel("am", engine.settings.channels["am"], kafka_defaults=KafkaSettings())
    events = [failed_event(1, project="staging", time=now_iso()), failed_event(2, project="prod", time=now_iso())]
    await send_all(channel, notifications(engine, events))
    alerts = {a["labels"]["project"]: a["status"] for a in await server.alerts()}
    assert alerts["staging"] == {"state": "suppressed", "silencedBy": [silence_id], "inhibitedBy": []}
    assert alerts["prod"]["state"] == "active"


async def test_one_member_down_still_delivers_both_down_is_retriable(
    tmp_path: Path, alertmanager_factory: AmFactory, caplog: pytest.LogCaptureFixture
) -> None:
    live, dead = await alertmanager_factory(), await alertmanager_factory()
    await dead.stop()
    channel, notification = setup(tmp_path, [dead.url, live.url])
    with caplog.at_level(logging.WARNING, "router.channels.alertmanager"):
        await send_all(channel, [notification])
    assert len(await live.alerts()) == 1
    assert dead.url in caplog.text and "taken by another" in caplog.text
    await live.stop()
    channel, notification = setup(tmp_path, [dead.url, live.url])
    err = await send_failing(channel, notification)
    assert err.retriable and dead.url in str(err) and live.url in str(err)


async def test_tls_and_basic_auth(
    tmp_path: Path, alertmanager_factory: AmFactory, ca: trustme.CA, ca_pem_path: Path
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "am.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "am.key"))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    server = await alertmanager_factory(
        web_config={
            "tls_server_config": {"cert_file": str(tmp_path / "am.pem"), "key_file": str(tmp_path / "am.key")},
            "basic_auth_users": {AM_USER: AM_PASSWORD_HASH},
        },
        client_tls=client_tls,
        client_headers={"Authorization": BasicAuth(username=AM_USER, password=AM_PASSWORD).header()},
    )
    assert server.url.startswith("https://")
    tls = {"ca_file": str(ca_pem_path)}
    channel, notification = setup(
        tmp_path, server.url, tls=tls, basic_auth={"username": AM_USER, "password": AM_PASSWORD}
    )
    try:
        assert "1/1 Alertmanager(s) ready" in await channel.health()
    finally:
        await send_all(channel, [notification])
    assert len(await server.alerts()) == 1

    wrong = "wrong-Pa55word"
    channel, notification = setup(tmp_path, server.url, tls=tls, basic_auth={"username": AM_USER, "password": wrong})
    err = await send_failing(channel, notification)
    assert not err.retriable and "HTTP 401" in str(err) and wrong not in str(err)

    channel, notification = setup(tmp_path, server.url)  # the system CAs do not know the test CA
    err = await send_failing(channel, notification)
    assert not err.retriable and "certificate" in str(err).lower()


async def test_bearer_token_and_retriable_5xx(tmp_path: Path) -> None:
    async with WebhookCapture([503, 400]) as capture:
        channel, notification = setup(tmp_path, capture.url + "/prefix", bearer_token=BEARER)
        try:
            for retriable in (True, False):
                failed = await send_failing(channel, notification)
                assert failed.retriable is retriable and BEARER not in str(failed)
            await send_all(channel, [notification])
        finally:
            await channel.close()
        requests = await capture.wait_for(3)
    assert {r.path for r in requests} == {"/prefix/api/v2/alerts"}
    assert requests[-1].headers["authorization"] == f"Bearer {BEARER}"
    (alert,) = requests[-1].json()
    assert alert == notification.payload["alerts"][0]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"url": "http://am:9093", "bearer_token": "t", "basic_auth": {"username": "u", "password": "p"}}, "not both"),
        ({"url": "http://u:secret@am:9093"}, "basic_auth, not in the URL"),
        ({"url": []}, "at least 1"),
        ({"url": "http://am:9093", "resolve_after": "soon"}, "not a duration"),
    ],
)
def test_config_errors(tmp_path: Path, config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        make_engine(tmp_path, {"am": {"type": "alertmanager", **config}})
    assert "secret" not in str(caught.value)
