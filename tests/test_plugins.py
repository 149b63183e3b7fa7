"""Third-party channel types (entry-point group ``imm_router.channels``): the example package in
tests/plugins/imm-router-file-channel is pip-installed into this virtualenv and routed through end to end,
with retries and rate limits; broken plugins are reported by package and leave the built-in types working."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.channels.registry import channel_types
from router.cli import main
from router.delivery.pipeline import Delivery, DeliveryFailed
from router.embedded.broker import TansuBroker
from router.embedded.webhook import WebhookCapture
from router.errors import ConfigError
from router.metrics import Metrics
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
from tests.test_service import config, failed_task, kafka_only_rules, produce, running, wait_until

pytestmark = pytest.mark.timeout(120)

PLUGIN = ROOT / "tests" / "plugins" / "imm-router-file-channel"


@pytest.fixture(scope="session")
def file_plugin(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The example plugin installed into the running virtualenv, offline, from a copy (pip builds in the
    source tree, which must stay clean)."""
    source = tmp_path_factory.mktemp("plugin") / PLUGIN.name
    shutil.copytree(PLUGIN, source)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    done = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip install {PLUGIN.name} failed:\n{done.stdout}\n{done.stderr}"
    importlib.invalidate_caches()


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """The shipped templates plus the ones a ``file`` channel needs (block ``text``)."""
    path = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", path)
    (path / "file").mkdir()
    (path / "file" / "alert.j2").write_text("{% block text %}{{ rule.name }} {{ imm.task_id }}{% endblock %}")
    (path / "digest" / "file.j2").write_text(
        "{% block text %}digest of {{ count }}: {% for a in alerts %}{{ a.imm.task_id }} {% endfor %}{% endblock %}"
    )
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_plugin_channel_routes_end_to_end(
    file_plugin: None, templates: Path, tansu: TansuBroker, unique_topic: Any, tmp_path: Path
) -> None:
    topic = unique_topic("events")
    out = tmp_path / "alerts.jsonl"
    path = config(
        tmp_path,
        tansu.bootstrap_servers,
        topic,
        rules_dir=kafka_only_rules(tmp_path, "file/alert.j2", "out"),
        channels={"out": {"type": "file", "path": str(out)}},
    )
    path.write_text(json.dumps({**json.loads(path.read_text()), "templates_dir": str(templates)}))
    ids = [f"plug-{i}" for i in range(3)]
    async with running(path):
        await produce(tansu.bootstrap_servers, topic, [(failed_task(i), []) for i in ids])
        await wait_until(lambda: len(lines(out)) == 3, what=lambda: f"3 lines in {out}: {lines(out)}")
    assert sorted(line["text"] for line in lines(out)) == [f"any-failure {i}" for i in ids]
    types, problems = channel_types()
    assert types["file"].origin == "imm-router-file-channel 0.1.0, imm_router_file_channel:FileChannel"
    assert not problems


async def test_retries_and_rate_limits_apply_to_a_plugin_channel(
    file_plugin: None, templates: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    channels = {
        "out": {"type": "file", "path": str(out), "rate_limit": {"per_minute": 2}},
        "nowhere": {
            "type": "file",
            "path": str(tmp_path / "missing" / "x.jsonl"),
            "retry": {"attempts": 3},
            "circuit_breaker": {"failure_threshold": 100},  # (5 failures in a row would open it)
        },
    }
    engine = make_engine(tmp_path, channels, templates_dir=str(templates))
    clock = VirtualClock()
    metrics = Metrics()
    delivery = virtual_delivery(engine, clock, metrics)
    batch = notifications(engine, [failed_event(i) for i in range(5)])
    try:
        outcomes = await asyncio.gather(*(delivery.deliver(n) for n in batch), return_exceptions=True)
    finally:
        await delivery.close(1)
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["digested"] * 3 + ["sent"] * 2
    written = lines(out)
    assert len(written) == 3 and written[2]["text"] == "digest of 3: " + " ".join(task_id(i) for i in (2, 3, 4))
    assert clock.elapsed >= 60  # the digest waited for the window
    failed = [o for o in outcomes if isinstance(o, DeliveryFailed)]
    assert len(failed) == 5 and all(f.attempts == 3 and "cannot append" in f.reason for f in failed)
    assert counted(metrics, "notifications_retried", "nowhere") == 10


def test_a_plugin_config_is_validated_like_a_built_in_one(file_plugin: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(tmp_path, {"out": {"type": "file", "pathh": "x"}})
    assert "router.yaml:1: channels.out.path: required key is missing" in str(caught.value)
    assert "channels.out.pathh: unknown key; did you mean 'path'?" in str(caught.value)


def test_check_lists_the_channel_types_and_where_they_come_from(
    file_plugin: None, templates: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_engine(tmp_path, {"out": {"type": "file", "path": str(tmp_path / "o")}}, templates_dir=str(templates))
    assert main(["check", "--config", str(tmp_path / "router.yaml")]) == 0
    shown = capsys.readouterr().out
    assert "channels:  1: out (file)" in shown
    assert "channel types: alertmanager, dingtalk, email, kafka, webhook (built in)" in shown
    assert "file (plugin: imm-router-file-channel 0.1.0, imm_router_file_channel:FileChannel)" in shown


# --- broken plugins ---------------------------------------------------------------------------------

BROKEN = {
    # type name -> (module source, what the report says)
    "broken-import": ("import imm_router_no_such_module\n", "ModuleNotFoundError: No module named"),
    "broken-model": (
        "from pydantic import BaseModel\nclass Config(BaseModel):\n    pass\n"
        "class Channel:\n    config_model = Config\n",
        "config_model, a subclass of router.channels.base.ChannelConfigBase",
    ),
    "broken-type": (
        "from typing import Literal\nfrom router.channels.base import ChannelConfigBase\n"
        "class Config(ChannelConfigBase):\n    type: Literal['other']\n"
        "class Channel:\n    config_model = Config\n",
        'Config.type must be Literal["broken-type"]',
    ),
    "dingtalk": ("class Channel:\n    pass\n", "taken by built in"),
}


@pytest.fixture
def broken_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution, imm-router-broken 0.1, whose entry points are broken in every way."""
    site = tmp_path / "site"
    info = site / "imm_router_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imm-router-broken\nVersion: 0.1\n")
    points = ["[imm_router.channels]"]
    for kind, (source, _) in BROKEN.items():
        module = f"imm_router_{kind.replace('-', '_')}_plugin"
        (site / f"{module}.py").write_text(source)
        points.append(f"{kind} = {module}:Channel")
    (info / "entry_points.txt").write_text("\n".join(points) + "\n")
    monkeypatch.syspath_prepend(str(site))
    yield site


async def test_broken_plugins_are_reported_and_built_in_channels_still_work(
    broken_plugins: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with WebhookCapture() as hook:
        engine = make_engine(tmp_path, {"hook": {"type": "webhook", "url": f"{hook.url}/h"}})
        assert main(["check", "--config", str(tmp_path / "router.yaml")]) == 0
        shown = capsys.readouterr()
        assert main(["check", "--strict", "--config", str(tmp_path / "router.yaml")]) == 2
        delivery = Delivery(engine, {}, Metrics())
        try:
            assert await delivery.deliver(notifications(engine, [failed_event(1)])[0]) == "sent"
        finally:
            await delivery.close(1)
    for kind, (_, reason) in BROKEN.items():
        line = next(line for line in shown.err.splitlines() if f"channel type {kind!r}" in line)
        assert line.startswith("warning: plugin not loaded:") and "package imm-router-broken 0.1" in line
        assert reason in line
    assert "config OK" in shown.out and "(4 warning(s) above)" in shown.out
    assert "channel types: alertmanager, dingtalk, email, kafka, webhook (built in)" in shown.out


def test_a_channel_of_a_broken_plugin_names_the_package(broken_plugins: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(tmp_path, {"out": {"type": "broken-import"}})
    message = str(caught.value)
    assert "router.yaml" in message and "channel 'out'" in message
    assert "from package imm-router-broken 0.1: cannot import imm_router_broken_import_plugin:Channel" in message
