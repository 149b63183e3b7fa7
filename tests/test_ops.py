"""The operational surface of `imm-router run`: metrics and probes against a running router, hot reload
(a ConfigMap-style symlink swap), JSON logs with secrets redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import aiohttp

from router.config import load_settings
from router.delivery.pipeline import Delivery
from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.engine import load
from router.ops import JsonFormatter, Redactor, Watcher, fingerprint, secret_values, setup_logging
from router.service import Service
from tests.conftest import ROOT
from tests.test_service import alert_ids, failed_task, produce, start_router, wait_until


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status, await response.text()
        except aiohttp.ClientError:
            return 0, ""


async def wait_http(url: str, predicate, what: str, timeout: float = 30.0) -> str:  # type: ignore[no-untyped-def]
    """Poll ``url`` until ``predicate(status, body)`` holds."""
    result: list[str] = []

    async def check() -> bool:
        status, body = await get(url)
        if predicate(status, body):
            result.append(body)
            return True
        return False

    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what} at {url}")
        await asyncio.sleep(0.1)
    return result[0]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + wanted + "}" if wanted else " ")) or (
            wanted and line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def configmap(root: Path, version: str, rule_when: str) -> None:
    """Lay out a directory as kubelet does: files under ..<version>/, ..data → it, names → ..data/name."""
    data = root / f"..{version}"
    data.mkdir(parents=True)
    (data / "r.yaml").write_text(
        f'rules:\n  - name: reloadable\n    when: "{rule_when}"\n'
        "    notify: [{channel: alerts, template: kafka/alert.json.j2}]\n"
    )
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, root / "..data")  # the atomic swap
    if not (root / "r.yaml").is_symlink():
        (root / "r.yaml").symlink_to("..data/r.yaml")


def router_config(tmp_path: Path, bootstrap: str, topic: str, alerts: str, port: int, rules: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(
        json.dumps(
            {
                "rules_dir": str(rules),
                "templates_dir": str(ROOT / "templates"),
                "channels": {
                    "alerts": {"type": "kafka", "topic": alerts},
                    "secret-hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook?token=hook-s3cr3t-DDD"},
                },
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topics": [topic],
                    "group_id": f"{topic}-g",
                    "dead_letter_topic": f"{topic}-dlq",
                    "session_timeout_ms": 1000,
                    "heartbeat_interval_ms": 200,
                },
                "service": {"commit_interval_seconds": 0.1, "reload_poll_seconds": 0.2, "health_interval_seconds": 0.5},
                "http": {"host": "127.0.0.1", "port": port},
                "log_level": "INFO",
            }
        )
    )
    return path


async def test_metrics_probes_and_hot_reload_of_a_running_router(tansu_factory, unique_topic, tmp_path: Path) -> None:
    broker: TansuBroker = await tansu_factory()
    topic, alerts = unique_topic("events"), unique_topic("alerts")
    rules = tmp_path / "rules"
    rules.mkdir()
    configmap(rules, "v1", "imm.outcome == 'failed'")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = router_config(tmp_path, broker.bootstrap_servers, topic, alerts, port, rules)
    log_path = tmp_path / "router.log"
    router = await start_router(path, log_path)
    try:
        assert (await wait_http(f"{base}/healthz", lambda s, b: s == 200, "liveness")) == '{"status": "ok"}'
        ready = json.loads(await wait_http(f"{base}/readyz", lambda s, b: s == 200, "readiness"))
        assert ready["broker"] == "ok" and ready["rules"] == 1

        await produce(broker.bootstrap_servers, topic, [(failed_task("m-1"), []), (b"{poison", [])])
        await alert_ids(broker.bootstrap_servers, alerts, {"m-1"})
        text = await wait_http(
            f"{base}/metrics",
            lambda s, b: (
                metric(b, "imm_router_offset_commits_total") > 0
                and metric(b, "imm_router_dead_letter_records_total", reason="decode") == 1
            ),
            "counters to move",
        )
        assert metric(text, "imm_router_records_consumed_total", wire_format="payload") == 1
        assert metric(text, "imm_router_decode_failures_total") == 1
        assert metric(text, "imm_router_rule_matches_total", rule="reloadable") == 1
        assert metric(text, "imm_router_notifications_sent_total", channel="alerts") == 1
        assert "imm_router_delivery_latency_seconds_bucket" in text and "imm_router_build_info" in text

        # The webhook channel points at a closed port: reported as degraded, the router stays ready.
        ready = json.loads(
            await wait_http(
                f"{base}/readyz", lambda s, b: "secret-hook" in json.loads(b)["degraded"], "degraded channel reported"
            )
        )
        assert ready["ready"] is True

        # Hot reload through a ConfigMap-style symlink swap: the next event follows the new rule.
        configmap(rules, "v2", "imm.outcome == 'failed' && imm.project == 'only-this'")
        await wait_http(
            f"{base}/metrics", lambda s, b: metric(b, "imm_router_config_reloads_total", result="ok") >= 1, "reload ok"
        )
        await produce(
            broker.bootstrap_servers,
            topic,
            [
                (failed_task("m-2"), []),
                (json.dumps({"TaskId": "m-3", "Status": "Failed", "ProjectName": "only-this"}).encode(), []),
            ],
        )
        ids = await alert_ids(broker.bootstrap_servers, alerts, {"m-1", "m-3"})
        assert "m-2" not in ids

        # A broken rule set is refused: counted, the old rules keep working.
        configmap(rules, "v3", "imm.outcome == ")
        await wait_http(
            f"{base}/metrics",
            lambda s, b: metric(b, "imm_router_config_reloads_total", result="failed") >= 1,
            "reload failed",
        )
        await produce(
            broker.bootstrap_servers,
            topic,
            [
                (json.dumps({"TaskId": "m-4", "Status": "Failed", "ProjectName": "only-this"}).encode(), []),
            ],
        )
        await alert_ids(broker.bootstrap_servers, alerts, {"m-1", "m-3", "m-4"})

        # SIGHUP reloads too.
        configmap(rules, "v4", "imm.outcome == 'failed'")
        router.send_signal(signal.SIGHUP)
        await wait_http(
            f"{base}/metrics",
            lambda s, b: metric(b, "imm_router_config_reloads_total", result="ok") >= 2,
            "second reload",
        )

        # Broker down → not ready; back → ready again.
        broker.kill()
        await wait_http(f"{base}/readyz", lambda s, b: s == 503, "unready without the broker")
        await broker.restart()
        await wait_http(f"{base}/readyz", lambda s, b: s == 200, "ready again")
    finally:
        router.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(router.wait(), 30)
    logs = log_path.read_text()
    assert code == 0, logs[-3000:]
    assert "hook-s3cr3t-DDD" not in logs and "hook-s3cr3t-DDD" not in text
    entries = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert entries and {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("reload failed" in e["message"] and "r.yaml:3" in e["message"] for e in entries)


def test_secrets_are_redacted_from_log_messages_and_tracebacks(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DINGTALK_TOKEN", "tok-s3cr3t-AAA")
    monkeypatch.setenv("DINGTALK_SECRET", "sig-s3cr3t-BBB")
    monkeypatch.setenv("SMTP_PASSWORD", "pw-s3cr3t-CCC")
    settings = load_settings(ROOT / "router.example.yaml")
    assert {"sig-s3cr3t-BBB", "pw-s3cr3t-CCC"} <= secret_values(settings)
    assert Redactor(secret_values(settings)).scrub("token tok-s3cr3t-AAA leaked") == "token *** leaked"
    stream = io.StringIO()
    setup_logging(settings, stream)
    log = logging.getLogger("router.test")
    log.warning("POST https://oapi.dingtalk.com/robot/send?access_token=%s failed", "tok-s3cr3t-AAA")
    try:
        raise RuntimeError("login failed with pw-s3cr3t-CCC and sig-s3cr3t-BBB")
    except RuntimeError:
        log.exception("boom")
    out = stream.getvalue()
    for secret in ("tok-s3cr3t-AAA", "sig-s3cr3t-BBB", "pw-s3cr3t-CCC"):
        assert secret not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["message"] == "POST *** failed"  # the whole URL is a secret
    assert "RuntimeError: login failed with *** and ***" in lines[1]["exception"]
    logging.getLogger().handlers.clear()


def test_redactor_and_formatter_without_secrets() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    assert Redactor().filter(record)
    assert json.loads(JsonFormatter().format(record))["message"] == "hello world"


def test_fingerprint_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    configmap(tmp_path, "v1", "a")
    before = fingerprint([tmp_path])
    configmap(tmp_path, "v2", "a && b")
    assert fingerprint([tmp_path]) != before
    assert all(".." not in name for name, _, _ in before)
    shutil.rmtree(tmp_path / "..v1")


def reload_config(path: Path, url: str, when: str = "imm.outcome == 'failed'") -> None:
    rules = path.parent / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "r.yaml").write_text(
        json.dumps(
            {
                "rules": [
                    {"name": "r", "when": when, "notify": [{"channel": "hook", "template": "webhook/alert.json.j2"}]}
                ]
            }
        )
    )
    doc = {
        "rules_dir": "rules",
        "templates_dir": str(ROOT / "templates"),
        "channels": {"hook": {"type": "webhook", "url": url}},
    }
    path.write_text(json.dumps(doc))


async def test_a_reload_failing_half_way_changes_nothing_and_the_watcher_keeps_watching(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    reload_config(path, "http://127.0.0.1:9/first")
    service = Service(load(path), path)
    service.delivery = Delivery(service.engine, {}, service.metrics)
    first_engine, first_channel = service.engine, service.delivery.channels["hook"]
    watcher = asyncio.create_task(Watcher(service, 0.05).run())
    registry = service.metrics.registry

    def reloads(result: str) -> float:
        return registry.get_sample_value("imm_router_config_reloads_total", {"result": result}) or 0.0

    try:
        # Channels that cannot be built (a webhook URL that is no URL), then a `when` deep enough for a
        # RecursionError: neither may leave the config half-applied or end the watcher.
        reload_config(path, "not a url at all")
        await wait_until(lambda: reloads("failed") >= 1, what="the first failed reload")
        reload_config(path, "http://127.0.0.1:9/second", when="(" * 5000 + "imm.failed" + ")" * 5000)
        await wait_until(lambda: reloads("failed") >= 2, what="the second failed reload")
        assert service.engine is first_engine and service.delivery.channels["hook"] is first_channel
        assert reloads("ok") == 0
        reload_config(path, "http://127.0.0.1:9/third", when="imm.outcome == 'succeeded'")
        await wait_until(lambda: reloads("ok") >= 1, what="the valid edit's reload")
        assert service.engine is not first_engine
        assert service.engine.rules.rules[0].spec.when == "imm.outcome == 'succeeded'"
        assert service.delivery.channels["hook"] is not first_channel
        assert not watcher.done()
    finally:
        service.stop()
        await asyncio.wait_for(watcher, 5)
        await service.delivery.close(1)
