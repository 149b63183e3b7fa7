"""Alertmanager-style durations (``30s``, ``5m``, ``1h30m``) and ``time_intervals``."""

from __future__ import annotations

import calendar
import difflib
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator, PrivateAttr, ValidationInfo, field_validator, model_validator

from router.channels.base import Frozen

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


# --- time_intervals (Alertmanager's shape and semantics, see its timeinterval package) ----------------

# Index = Go's time.Weekday (sunday = 0): Alertmanager's ranges run sunday..saturday and do not wrap.
_WEEKDAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
# Alertmanager's own pattern: two-digit hours, 00:00..23:59, plus 24:00 as the end of the day.
_TIME = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]|24:00")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # what Go's strconv.Atoi takes; not Python's int() ("1_0", " 1")
_YEAR = re.compile(r"[0-9]{4}")
_MONTH_LENGTHS = (28, 29, 30, 31)

_WEEKDAY_HINT = "write monday…sunday or a range like monday:friday"
_DAY_HINT = (
    "write 1…31, or -31…-1 to count back from the month's end (-1 is its last day), or a range like 1:5 or -3:-1"
)
_MONTH_HINT = "write january…december or 1…12, or a range like january:march"
_YEAR_HINT = "write a 4-digit year like 2026 or a range like 2026:2027"


def _shown(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _sexagesimal(value: Any) -> str:
    """PyYAML (YAML 1.1) reads an unquoted ``1:5`` as the base-60 number 65: say so when a number could be that."""
    if isinstance(value, int) and not isinstance(value, bool) and 60 <= value < 3600:
        a, b = divmod(value, 60)
        return f' (YAML reads an unquoted {a}:{b} as the number {value}; quote it: "{a}:{b}")'
    return ""


def _text(field: str, value: Any, what: str, hint: str) -> str:
    """One list entry as text. Numbers are taken, as Alertmanager's YAML decoder takes ``days_of_month: [1, 15]``."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value).strip().lower()
    if isinstance(value, dict) and len(value) == 1:
        # `[monday: friday]`: a space after the colon turns a flow-list entry into a mapping.
        ((key, val),) = value.items()
        raise ValueError(f'{field}: {value!r} is a mapping, not {what}; drop the space after the colon: "{key}:{val}"')
    raise ValueError(f"{field}: {_shown(value)} is not {what}; {hint}")


def _bounds(field: str, value: Any, text: str, member: Callable[[str], int], hint: str) -> tuple[int, int]:
    """``a`` or ``a:b`` as an inclusive (begin, end); ``member`` parses one side and raises on a bad one."""
    parts = text.split(":")
    if len(parts) > 2:
        raise ValueError(f"{field}: {_shown(value)} has more than one colon; {hint}")
    return member(parts[0].strip()), member(parts[-1].strip())


def _inside(part: str, value: Any) -> str:
    # Name the whole entry too when only one side of a range is wrong.
    return "" if part == str(value).strip().lower() else f" (in {_shown(value)})"


def _weekday_range(value: Any) -> tuple[int, int]:
    text = _text("weekdays", value, "a weekday", _WEEKDAY_HINT)

    def member(part: str) -> int:
        if part in _WEEKDAYS:
            return _WEEKDAYS.index(part)
        raise ValueError(f'weekdays: "{part}"{_inside(part, value)} is not a weekday; {_WEEKDAY_HINT}')

    begin, end = _bounds("weekdays", value, text, member, _WEEKDAY_HINT)
    if begin > end:
        raise ValueError(
            f"weekdays: {_shown(value)} runs backwards; a range runs sunday to saturday and cannot wrap, "
            f'so write two entries: "{_span(_WEEKDAYS, begin, 6)}" and "{_span(_WEEKDAYS, 0, end)}"'
        )
    return begin, end


def _span(names: tuple[str, ...], begin: int, end: int) -> str:
    return names[begin] if begin == end else f"{names[begin]}:{names[end]}"


def _day_range(value: Any) -> tuple[int, int]:
    text = _text("days_of_month", value, "a day of the month", _DAY_HINT)

    def member(part: str) -> int:
        if not _INTEGER.fullmatch(part):
            raise ValueError(f'days_of_month: "{part}"{_inside(part, value)} is not a day of the month; {_DAY_HINT}')
        day = int(part)
        if day == 0 or not -31 <= day <= 31:
            raise ValueError(f"days_of_month: {day} is not a day of the month; {_DAY_HINT}{_sexagesimal(value)}")
        return day

    begin, end = _bounds("days_of_month", value, text, member, _DAY_HINT)
    # Alertmanager's load-time checks, kept as is so a config means the same in both places.
    if begin < 0 < end:
        raise ValueError(
            f"days_of_month: {_shown(value)} starts counting from the month's end but ends counting from its "
            f'start; make both days negative (e.g. "-3:-1") or both positive'
        )
    # Negative days are checked against a 28-day month, as Alertmanager does: 28 + day.
    check_begin, check_end = (28 + begin if begin < 0 else begin), (28 + end if end < 0 else end)
    if check_begin > check_end:
        if (begin < 0) == (end < 0):
            raise ValueError(f'days_of_month: {_shown(value)} ends before it starts; write "{end}:{begin}"')
        raise ValueError(
            f"days_of_month: {_shown(value)} is refused as Alertmanager refuses it: a range with a negative end "
            f"is checked against a 28-day month, counting {end} as day {check_end}, which is before {begin}; "
            f'write a positive end day instead (a day past a month\'s end stands for its last day, so "{begin}:31" '
            f"runs to the end of every month)"
        )
    return begin, end


def _month_range(value: Any) -> tuple[int, int]:
    text = _text("months", value, "a month", _MONTH_HINT)

    def member(part: str) -> int:
        if part in _MONTHS:
            return _MONTHS.index(part) + 1
        if _INTEGER.fullmatch(part) and 1 <= int(part) <= 12:
            return int(part)
        raise ValueError(f'months: "{part}"{_inside(part, value)} is not a month; {_MONTH_HINT}{_sexagesimal(value)}')

    begin, end = _bounds("months", value, text, member, _MONTH_HINT)
    if begin > end:
        raise ValueError(
            f"months: {_shown(value)} runs backwards; a range cannot wrap past december, so write two entries: "
            f'"{_span(_MONTHS, begin - 1, 11)}" and "{_span(_MONTHS, 0, end - 1)}"'
        )
    return begin, end


def _year_range(value: Any) -> tuple[int, int]:
    text = _text("years", value, "a year", _YEAR_HINT)

    def member(part: str) -> int:
        if _YEAR.fullmatch(part):
            return int(part)
        raise ValueError(f'years: "{part}"{_inside(part, value)} is not a year; {_YEAR_HINT}')

    begin, end = _bounds("years", value, text, member, _YEAR_HINT)
    if begin > end:
        raise ValueError(f'years: {_shown(value)} ends before it starts; write "{end}:{begin}"')
    return begin, end


def _checked(parse: Callable[[Any], tuple[int, int]]) -> Callable[[Any], str]:
    """A before-validator for one list entry: errors point at the entry; the entry is kept as written."""

    def check(value: Any) -> str:
        parse(value)
        return str(value).strip()

    return check


_WeekdayText = Annotated[str, BeforeValidator(_checked(_weekday_range))]
_DayText = Annotated[str, BeforeValidator(_checked(_day_range))]
_MonthText = Annotated[str, BeforeValidator(_checked(_month_range))]
_YearText = Annotated[str, BeforeValidator(_checked(_year_range))]


def _zone(name: str) -> tzinfo | None:
    """The zone for ``location``; None is the host's local zone (``datetime.astimezone(None)``, DST included)."""
    if name == "Local":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    known = zoneinfo.available_timezones() | {"Local"}
    close = [zone for zone in known if zone.lower() == name.strip().lower()] or difflib.get_close_matches(
        name.strip(), known, n=1, cutoff=0.8
    )
    guess = f'did you mean "{close[0]}"? ' if close else ""
    raise ValueError(
        f'location: "{name}" is not an IANA time zone; {guess}write a zone name like Asia/Shanghai or UTC, '
        f"or Local for this host's zone"
    )


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class TimeOfDay(Frozen):
    """``start_time`` (inclusive) to ``end_time`` (exclusive), HH:MM from 00:00 to 24:00, within one day."""

    start_time: str
    end_time: str

    _start: int = PrivateAttr(default=0)
    _end: int = PrivateAttr(default=0)

    @field_validator("start_time", "end_time", mode="before")
    @classmethod
    def _hh_mm(cls, value: Any, info: ValidationInfo) -> Any:
        field = info.field_name
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1440:
            # PyYAML reads an unquoted 22:00 as the base-60 number 1320.
            hh_mm = f"{value // 60:02d}:{value % 60:02d}"
            raise ValueError(
                f"times: {field} {value} is a number, not a time: YAML reads an unquoted {value // 60}:"
                f'{value % 60:02d} as one; quote it: {field}: "{hh_mm}"'
            )
        if not isinstance(value, str) or not _TIME.fullmatch(value):
            raise ValueError(
                f'times: {field} {_shown(value)} is not a time; write HH:MM with two-digit hours, "00:00" to '
                f'"24:00", e.g. "09:30"'
            )
        if field == "start_time" and value == "24:00":
            raise ValueError('times: start_time "24:00" is the end of the day, nothing starts there; write "00:00"')
        return value

    @model_validator(mode="after")
    def _ordered(self) -> TimeOfDay:
        start, end = _minutes(self.start_time), _minutes(self.end_time)
        if end == 0:
            raise ValueError('times: end_time "00:00" is the start of the day; to run until midnight write "24:00"')
        if start == end:
            raise ValueError(
                f'times: start_time and end_time are both "{self.start_time}", an empty range; for the whole day '
                f'write "00:00" to "24:00" or leave out times'
            )
        if start > end:
            raise ValueError(
                f'times: start_time "{self.start_time}" is after end_time "{self.end_time}"; a range cannot cross '
                f'midnight, so write two: "{self.start_time}" to "24:00" and "00:00" to "{self.end_time}"'
            )
        self._start, self._end = start, end
        return self

    @property
    def minutes(self) -> tuple[int, int]:
        """(start, end) in minutes since midnight, end exclusive."""
        return self._start, self._end


_UNITS_OF = {
    "times": "time of day",
    "weekdays": "day of the week",
    "days_of_month": "day of the month",
    "months": "month",
    "years": "year",
}


class TimeRange(Frozen):
    """One entry of a named interval: every listed field must match (an absent field matches all), in
    ``location`` (an IANA zone, or Local for the host's; UTC when absent)."""

    times: tuple[TimeOfDay, ...] | None = None
    weekdays: tuple[_WeekdayText, ...] | None = None
    days_of_month: tuple[_DayText, ...] | None = None
    months: tuple[_MonthText, ...] | None = None
    years: tuple[_YearText, ...] | None = None
    location: str = "UTC"

    # Parsed once at load; None = the field is absent and matches everything.
    _zone: tzinfo | None = PrivateAttr(default=UTC)
    _minutes: tuple[tuple[int, int], ...] | None = PrivateAttr(default=None)
    _weekdays: frozenset[int] | None = PrivateAttr(default=None)
    _days: dict[int, frozenset[int]] | None = PrivateAttr(default=None)  # by the month's length
    _months: frozenset[int] | None = PrivateAttr(default=None)
    _years: tuple[tuple[int, int], ...] | None = PrivateAttr(default=None)

    @field_validator("times", "weekdays", "days_of_month", "months", "years")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...] | None, info: ValidationInfo) -> tuple[Any, ...] | None:
        # Alertmanager takes `weekdays: []` and then never matches; that is a silent trap, so refuse it.
        field = str(info.field_name)
        if value is not None and not value:
            raise ValueError(
                f"{field}: an empty list matches no {_UNITS_OF[field]} at all; leave {field} out to match every "
                f"{_UNITS_OF[field]}, or list some"
            )
        return value

    @field_validator("location", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        if value is None or value == "":
            return "UTC"  # Alertmanager: no location, or Go's LoadLocation(""), is UTC
        if not isinstance(value, str):
            raise ValueError(f"location: {_shown(value)} is not a time zone; write a zone name like Asia/Shanghai")
        _zone(value)
        return value

    @model_validator(mode="after")
    def _parse(self) -> TimeRange:
        self._zone = _zone(self.location)
        if self.times is not None:
            self._minutes = tuple(t.minutes for t in self.times)
        if self.weekdays is not None:
            self._weekdays = frozenset(d for b, e in map(_weekday_range, self.weekdays) for d in range(b, e + 1))
        if self.days_of_month is not None:
            ranges = [_day_range(text) for text in self.days_of_month]
            self._days = {length: _month_days(ranges, length) for length in _MONTH_LENGTHS}
        if self.months is not None:
            self._months = frozenset(m for b, e in map(_month_range, self.months) for m in range(b, e + 1))
        if self.years is not None:
            self._years = tuple(_year_range(text) for text in self.years)
        return self

    def contains(self, moment: datetime) -> bool:
        """Whether ``moment`` (naive = UTC) falls in this range, read in its location."""
        local = _aware(moment).astimezone(self._zone)
        if self._minutes is not None:
            minute = local.hour * 60 + local.minute
            if not any(start <= minute < end for start, end in self._minutes):
                return False
        if self._weekdays is not None and local.isoweekday() % 7 not in self._weekdays:
            return False
        if self._days is not None and local.day not in self._days[calendar.monthrange(local.year, local.month)[1]]:
            return False
        if self._months is not None and local.month not in self._months:
            return False
        return self._years is None or any(begin <= local.year <= end for begin, end in self._years)


def _month_days(ranges: Iterable[tuple[int, int]], length: int) -> frozenset[int]:
    """The days ``days_of_month`` ranges cover in a month of ``length`` days, as Alertmanager's ContainsTime
    resolves them: negative days count back from the end (-1 = last); a range starting past the end matches
    nothing; an end past the end stops at the last day."""
    days: set[int] = set()
    for begin, end in ranges:
        first = length + begin + 1 if begin < 0 else begin
        last = length + end + 1 if end < 0 else end
        # Clamped to the month; one starting past its end covers nothing (Alertmanager skips it).
        days.update(range(max(first, 1), min(last, length) + 1))
    return frozenset(days)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class TimeInterval(Frozen):
    """A named set of time ranges; an instant is inside when any of its ranges contains it. As in Alertmanager,
    an interval with no ranges contains nothing (while a range with no fields contains everything)."""

    name: str
    time_intervals: tuple[TimeRange, ...] = ()

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name: give the interval a name; notify targets refer to it by that name")
        return value

    def contains(self, moment: datetime) -> bool:
        """Whether any of the ranges contains ``moment`` (naive = UTC)."""
        return any(time_range.contains(moment) for time_range in self.time_intervals)


def active(names: Iterable[str], intervals: Mapping[str, TimeInterval], moment: datetime) -> str | None:
    """The first of ``names`` whose interval contains ``moment``, or None. An unknown name raises KeyError
    (Alertmanager errors too): the engine checks the names at load, so one here is a bug, not a config typo."""
    for name in names:
        interval = intervals.get(name)
        if interval is None:
            raise KeyError(f"unknown time interval {name!r}")
        if interval.contains(moment):
            return name
    return None
