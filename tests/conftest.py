from __future__ import annotations

from pathlib import Path

import pytest

from router.engine import Engine, load

pytest_plugins = ["tests.servers"]

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "tests" / "events"
EXAMPLE_ENV = {"DINGTALK_TOKEN": "tok-example", "DINGTALK_SECRET": "sec-example", "SMTP_PASSWORD": "pw-example"}


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(key, value)
    return EXAMPLE_ENV


@pytest.fixture
def engine(example_env: dict[str, str]) -> Engine:
    return load(ROOT / "router.example.yaml")
