"""Alertmanager-style durations (``30s``, ``5m``, ``1h30m``) and ``time_intervals``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0, "w": 604_800.0, "y": 31_536_000.0}
_DURATION = re.compile(r"^(?:(\d+)(ms|s|m|h|d|w|y))+$")
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def parse_duration(text: str) -> float:
    """Seconds in an Alertmanager duration: one or more ``<integer><unit>`` with units ms, s, m, h, d, w,
    y, largest first (``1h30m``). Raises ValueError with what to write instead."""
    value = text.strip()
    if not _DURATION.match(value):
        raise ValueError(f"{text!r} is not a duration; write e.g. 30s, 5m, 2h or 1h30m")
    parts = _PART.findall(value)
    order = [list(_UNITS).index(unit) for _, unit in parts]
    if order != sorted(order, reverse=True) or len(set(order)) != len(order):
        raise ValueError(f"{text!r}: give each unit once, largest first (e.g. 1h30m)")
    return sum(int(n) * _UNITS[unit] for n, unit in parts)


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool):
        raise ValueError("a duration is a string like 30s, 5m or 1h30m")
    return value


# A duration in seconds, written in config as "30s", "5m", "1h30m" (a bare number is seconds).
Duration = Annotated[float, BeforeValidator(_duration)]


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for display: 5400 → 1h30m."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    rest = round(seconds)
    out = []
    for unit in ("d", "h", "m", "s"):
        size = int(_UNITS[unit])
        n, rest = divmod(rest, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"


# --- time_intervals (Alertmanager's shape) ------------------------------------------------------------

from router.channels.base import Frozen  # noqa: E402


class TimeOfDay(Frozen):
    start_time: str
    end_time: str


class TimeRange(Frozen):
    """One entry of a named interval: every listed field must match (an absent field matches all)."""

    times: tuple[TimeOfDay, ...] | None = None
    weekdays: tuple[str, ...] | None = None
    days_of_month: tuple[str, ...] | None = None
    months: tuple[str, ...] | None = None
    years: tuple[str, ...] | None = None
    location: str = "UTC"


class TimeInterval(Frozen):
    """A named set of time ranges; an instant is inside when any of its ranges contains it."""

    name: str
    time_intervals: tuple[TimeRange, ...] = ()
