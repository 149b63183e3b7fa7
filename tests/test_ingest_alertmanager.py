"""``POST /ingest/alertmanager`` against real servers: a Prometheus Alertmanager (Debian's 0.25) whose
webhook receiver points at the router service, Tansu, the embedded DingTalk server and SMTP capture.

Prometheus-style alerts posted into Alertmanager come out of the shipped rule as DingTalk messages and
mails, firing and then resolved; the alerts Alertmanager sends again when their group changes are
passed once. Wrong or missing tokens and malformed payloads are refused, counted and produce nothing;
a dead broker answers 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.config import load_settings
from router.decode import decode
from router.embedded.broker import TansuBroker
from router.embedded.dingtalk import FakeDingTalk
from router.embedded.smtp import SmtpCapture
from router.engine import load
from router.errors import ConfigError
from router.ops import secret_values
from router.sources.alertmanager import records
from router.sources.kafka import read_topic
from tests.conftest import EVENTS, ROOT
from tests.servers import DINGTALK_SECRET, DINGTALK_SIGNED_TOKEN
from tests.test_ingest import post, router
from tests.test_service import config, wait_until

TOKEN = "am-ingest-Hq7vR2-secret"
AM_EVENTS = EVENTS / "alertmanager"
URL = "/ingest/alertmanager"


def am_config(tmp_path: Path, bootstrap: str, topic: str, dingtalk: FakeDingTalk, smtp: SmtpCapture) -> Path:
    """The shipped rules and templates, their channels on the embedded servers, the endpoint enabled."""
    path = config(
        tmp_path,
        bootstrap,
        topic,
        rules_dir=ROOT / "rules",
        channels={
            "oncall-dingtalk": {
                "type": "dingtalk",
                "url": dingtalk.webhook_url(DINGTALK_SIGNED_TOKEN),
                "secret": DINGTALK_SECRET,
            },
            "ops-email": {
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp.port,
                "tls": "none",
                "from": "r@example.com",
                "to": ["o@example.com"],
            },
            "alerts-topic": {"type": "kafka", "topic": f"{topic}-alerts"},
        },
    )
    doc = json.loads(path.read_text())
    doc["http"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    doc["ingest"] = {"alertmanager": {"enabled": True, "token": TOKEN}}
    path.write_text(json.dumps(doc))
    return path


def receiver(base: str, token: str = TOKEN) -> dict[str, Any]:
    """Alertmanager's config: everything to a webhook receiver at the router, as README shows it."""
    return {
        "route": {
            "receiver": "imm-router",
            "group_by": ["alertname"],
            "group_wait": "100ms",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "imm-router",
                "webhook_configs": [
                    {
                        "url": f"{base}{URL}",
                        "send_resolved": True,
                        "http_config": {"authorization": {"type": "Bearer", "credentials": token}},
                    }
                ],
            }
        ],
    }


def alert(instance: str, severity: str, starts: datetime, ends: datetime | None = None) -> dict[str, Any]:
    """A Prometheus-style alert as Prometheus posts it to /api/v2/alerts."""
    body: dict[str, Any] = {
        "labels": {"alertname": "ImmWorkerDown", "instance": instance, "job": "imm", "severity": severity},
        "annotations": {"summary": f"{instance} is down", "runbook_url": "https://runbooks.example/worker-down"},
        "startsAt": starts.isoformat(),
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=up+%3D%3D+0",
    }
    if ends is not None:
        body["endsAt"] = ends.isoformat()
    return body


def test_event_files_are_what_ingest_makes_of_the_webhook() -> None:
    """The rule tests' events (tests/rules/alertmanager.yaml) stay what the endpoint produces."""
    made = [orjson.loads(r.value) for r in records((AM_EVENTS / "webhook.json").read_bytes())]
    files = [json.loads((AM_EVENTS / f"{n}.json").read_text()) for n in ("critical-firing", "warning-firing")]
    assert made[:2] == files and made[2] == json.loads((AM_EVENTS / "critical-resolved.json").read_text())
    firing, _, resolved = (decode(r.value, r.headers) for r in records((AM_EVENTS / "webhook.json").read_bytes()))
    assert (firing.type, firing.source, firing.subject) == (
        "alertmanager:firing",
        "http://alertmanager.example:9093",
        "NodeDown",
    )
    assert firing.id == "8d2a1b3c4e5f6a7b:firing:2026-11-30T08:15:04.123456789Z"
    assert firing.data["labels"]["severity"] == "critical" and firing.data["alertmanager"]["receiver"] == "imm-router"
    assert firing.view["status"] == "firing" and firing.view["end_time"] is None
    assert resolved.type == "alertmanager:resolved" and resolved.view["duration_seconds"] == 42 * 60 + 30
    assert resolved.time == datetime(2026, 11, 30, 7, 42, 30, tzinfo=UTC)  # a resolved alert's time is its end


async def test_prometheus_alerts_through_alertmanager_reach_dingtalk(
    tansu: TansuBroker, unique_topic, tmp_path: Path, alertmanager_factory, dingtalk: FakeDingTalk, smtp_plain
) -> None:
    topic = unique_topic("events")
    path = am_config(tmp_path, tansu.bootstrap_servers, topic, dingtalk, smtp_plain)
    now = datetime.now(UTC)
    async with router(path) as (service, base):
        am = await alertmanager_factory(config=receiver(base))
        # One group (alertname): a critical alert and a warning the shipped rule leaves alone.
        await am.api("POST", "/api/v2/alerts", [alert("w1:9100", "critical", now), alert("w2:9100", "warning", now)])
        first = await dingtalk.wait_for(1, timeout=20)
        assert "告警 FIRING ImmWorkerDown" in first[0].payload["markdown"]["title"]
        assert "w1:9100 is down" in first[0].payload["markdown"]["text"]
        # A second critical alert joins: Alertmanager sends the whole group again, w1 included.
        await am.api("POST", "/api/v2/alerts", [alert("w3:9100", "critical", now)])
        second = await dingtalk.wait_for(2, timeout=20)
        assert "w3:9100 is down" in second[1].payload["markdown"]["text"]
        await wait_until(
            lambda: service.metrics.suppressed.labels("oncall-dingtalk", "duplicate")._value.get() >= 1,
            what="w1 sent again by Alertmanager passed as a duplicate",
        )
        # w1 recovers: Alertmanager sends it resolved (send_resolved), and DingTalk hears so.
        await am.api("POST", "/api/v2/alerts", [alert("w1:9100", "critical", now, datetime.now(UTC))])
        third = await dingtalk.wait_for(3, timeout=20)
        assert "已恢复 RESOLVED ImmWorkerDown" in third[2].payload["markdown"]["title"]
        assert "w1:9100 is down" in third[2].payload["markdown"]["text"]
        mails = await smtp_plain.wait_for(3, timeout=20)
        source = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    texts = [m["markdown"]["text"] for m in dingtalk.messages]
    assert [("w1:9100" in t, "w3:9100" in t) for t in texts] == [(True, False), (False, True), (True, False)]
    assert sorted(m.subject.split("]")[0] for m in mails) == [
        "[FIRING CRITICAL",
        "[FIRING CRITICAL",
        "[RESOLVED CRITICAL",
    ]
    events = [decode(r.value, r.headers) for r in source]
    assert {e.type for e in events} == {"alertmanager:firing", "alertmanager:resolved"}
    # The source is Alertmanager's externalURL (its host name and port, unless --web.external-url says otherwise).
    assert all(e.source == e.data["alertmanager"]["externalURL"] for e in events)
    assert {e.source.rsplit(":", 1)[-1] for e in events} == {str(am.port)}
    assert {dict(r.headers)["imm-ingest"] for r in source} == {b"alertmanager"}
    w1 = [e for e in events if e.data["labels"]["instance"] == "w1:9100"]
    assert len({e.id for e in w1}) == 2 < len(w1)  # sent three times, two states


def payload(**changes: Any) -> bytes:
    doc = json.loads((AM_EVENTS / "webhook.json").read_text()) | changes
    return json.dumps(doc).encode()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def bad_alert(**changes: Any) -> bytes:
    doc = json.loads((AM_EVENTS / "webhook.json").read_text())
    doc["alerts"][1] |= changes
    return json.dumps(doc).encode()


REFUSALS = [
    ("missing token", {"Content-Type": "application/json"}, payload(), 403, "token"),
    ("wrong token", bearer("guess"), payload(), 403, "token"),
    ("token in another header", {"X-Imm-Router-Token": TOKEN}, payload(), 403, "token"),
    ("not JSON", bearer(), b"{nope", 400, "json"),
    ("not an object", bearer(), b"[]", 400, "payload"),
    ("another version", bearer(), payload(version="3"), 400, "version"),
    ("no alerts", bearer(), payload(alerts=[]), 400, "payload"),
    ("alerts not a list", bearer(), payload(alerts={"status": "firing"}), 400, "payload"),
    ("an alert not an object", bearer(), payload(alerts=[42]), 400, "payload"),
    ("an unknown status", bearer(), bad_alert(status="pending"), 400, "payload"),
    ("no labels", bearer(), bad_alert(labels={}), 400, "payload"),
    ("annotations not an object", bearer(), bad_alert(annotations=["x"]), 400, "payload"),
    ("no startsAt", bearer(), bad_alert(startsAt=None), 400, "payload"),
]


async def test_refusals_are_counted_and_produce_nothing(
    tansu: TansuBroker,
    unique_topic,
    tmp_path: Path,
    dingtalk: FakeDingTalk,
    smtp_plain: SmtpCapture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    topic = unique_topic("events")
    path = am_config(tmp_path, tansu.bootstrap_servers, topic, dingtalk, smtp_plain)
    answers = []
    async with router(path) as (service, base), aiohttp.ClientSession() as http:
        for name, headers, body, status, reason in REFUSALS:
            got, text = await post(http, f"{base}{URL}", headers, body)
            answers.append(text)
            assert (got, text.count("\n")) == (status, 1), f"{name}: {got} {text!r}"
            assert service.metrics.ingest_refused.labels("alertmanager", reason)._value.get() >= 1, name
        assert "alerts[1].status is 'pending'" in answers[9]  # names the alert and what is wrong
        async with http.get(f"{base}/metrics") as response:
            metrics = await response.text()
        # The whole batch is refused when one alert is bad; one good notification afterwards is all there is.
        assert (await post(http, f"{base}{URL}", bearer(), payload()))[0] == 204
    source = await read_topic({"bootstrap_servers": tansu.bootstrap_servers}, topic)
    fingerprints = sorted(json.loads(r.value)["data"]["fingerprint"] for r in source)
    assert fingerprints == ["1c2d3e4f5a6b7c8d", "8d2a1b3c4e5f6a7b", "f0e1d2c3b4a59687"]
    for reason in ("token", "json", "payload", "version"):
        assert f'imm_router_ingest_refused_total{{endpoint="alertmanager",reason="{reason}"}}' in metrics
    assert "ingest alertmanager: 403" in caplog.text
    assert TOKEN not in caplog.text and TOKEN not in metrics and not any(TOKEN in a for a in answers)


async def test_broker_down_answers_503_with_retry_after_until_it_is_back(
    tansu_factory, unique_topic, tmp_path: Path, dingtalk: FakeDingTalk, smtp_plain: SmtpCapture
) -> None:
    broker: TansuBroker = await tansu_factory()
    topic = unique_topic("events")
    path = am_config(tmp_path, broker.bootstrap_servers, topic, dingtalk, smtp_plain)
    doc = json.loads(path.read_text())
    doc["ingest"]["produce_timeout_seconds"] = 1
    path.write_text(json.dumps(doc))
    async with router(path) as (service, base), aiohttp.ClientSession() as http:
        assert (await post(http, f"{base}{URL}", bearer(), payload()))[0] == 204
        broker.kill()
        async with http.post(f"{base}{URL}", headers=bearer(), data=payload()) as response:
            # Alertmanager retries a 5xx answer with backoff: the alerts are not lost.
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert "Kafka did not confirm within 1s" in await response.text()
        assert service.metrics.ingest_refused.labels("alertmanager", "kafka")._value.get() == 1
        await broker.restart()
        # As Alertmanager does, the sender tries again until the broker takes the alerts.
        deadline = time.monotonic() + 30
        while (status := (await post(http, f"{base}{URL}", bearer(), payload()))[0]) != 204:
            assert status == 503 and time.monotonic() < deadline, status


@pytest.mark.parametrize(
    ("ingest", "expected"),
    [
        ({"alertmanager": {"enabled": True}}, "ingest.alertmanager needs token"),
        ({"alertmanager": {"enabled": True, "tokn": "x"}}, "tokn"),
    ],
)
def test_bad_alertmanager_ingest_config_is_refused_at_load(tmp_path: Path, ingest: Any, expected: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        json.dumps({"rules_dir": str(ROOT / "rules"), "templates_dir": str(ROOT / "templates"), "ingest": ingest})
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load(path)


def test_the_token_stays_hidden(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(json.dumps({"ingest": {"alertmanager": {"enabled": True, "token": TOKEN}}}))
    settings = load_settings(path)
    assert TOKEN not in repr(settings) + str(settings) + settings.model_dump_json()
    assert TOKEN in secret_values(settings)  # so the log redactor masks it
