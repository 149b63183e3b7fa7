"""Durations and Alertmanager ``time_intervals``: parsing, matching and the errors people read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter, ValidationError

from router.alerting import timing
from router.alerting.timing import (
    Duration,
    TimeInterval,
    TimeRange,
    active,
    format_duration,
    parse_duration,
)
from router.opsfile import load_yaml

SHANGHAI = ZoneInfo("Asia/Shanghai")
DURATION: TypeAdapter[float] = TypeAdapter(Duration)


def at(year: int, month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def span(**fields: Any) -> TimeRange:
    return TimeRange.model_validate(fields)


def days_matched(time_range: TimeRange, year: int, month: int) -> list[int]:
    """The days of a month whose noon (UTC) the range contains."""
    day, out = date(year, month, 1), []
    while day.month == month:
        if time_range.contains(at(day.year, day.month, day.day)):
            out.append(day.day)
        day += timedelta(days=1)
    return out


def error_of(fields: dict[str, Any]) -> tuple[tuple[int | str, ...], str]:
    with pytest.raises(ValidationError) as caught:
        TimeRange.model_validate(fields)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return tuple(errors[0]["loc"]), errors[0]["msg"]


# --- durations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7_200.0), ("1h30m", 5_400.0), ("1d", 86_400.0), ("500ms", 0.5)],
)
def test_duration_parses(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert DURATION.validate_python(text) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a duration"),
        ("5", "is not a duration"),  # no unit: Alertmanager needs one
        ("5x", "is not a duration"),
        ("1m1h", "largest first"),
        ("1h1h", "each unit once"),
    ],
)
def test_duration_rejects(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_duration(text)
    with pytest.raises(ValidationError, match=says):
        DURATION.validate_python(text)


def test_duration_rejects_a_boolean() -> None:
    # YAML reads `for: yes` / `for: true` as a boolean, which would otherwise pass as 1 second.
    with pytest.raises(ValidationError, match="a duration is a string"):
        DURATION.validate_python(True)


def test_format_duration_inverts_parse() -> None:
    assert [format_duration(parse_duration(t)) for t in ("1h30m", "500ms", "1d", "45s")] == [
        "1h30m",
        "500ms",
        "1d",
        "45s",
    ]


# --- times of day --------------------------------------------------------------------------------------


def test_times_start_inclusive_end_exclusive() -> None:
    evening = span(times=[{"start_time": "22:00", "end_time": "23:00"}])
    assert not evening.contains(at(2026, 3, 2, 21, 59, 59))
    assert evening.contains(at(2026, 3, 2, 22, 0))
    assert evening.contains(at(2026, 3, 2, 22, 59, 59))
    assert not evening.contains(at(2026, 3, 2, 23, 0))


def test_times_end_at_24_00_runs_to_midnight() -> None:
    late = span(times=[{"start_time": "23:30", "end_time": "24:00"}])
    assert late.contains(at(2026, 3, 2, 23, 59, 59))
    assert not late.contains(at(2026, 3, 3, 0, 0))
    whole_day = span(times=[{"start_time": "00:00", "end_time": "24:00"}])
    assert whole_day.contains(at(2026, 3, 2, 0, 0))
    assert whole_day.contains(at(2026, 3, 2, 23, 59, 59))


def test_times_any_of_several() -> None:
    split = span(times=[{"start_time": "00:00", "end_time": "08:00"}, {"start_time": "20:00", "end_time": "24:00"}])
    assert [split.contains(at(2026, 3, 2, hour)) for hour in (7, 8, 19, 20)] == [True, False, False, True]


# --- location --------------------------------------------------------------------------------------------


def test_location_reads_the_instant_in_its_zone() -> None:
    evening = {"times": [{"start_time": "22:00", "end_time": "23:00"}]}
    shanghai, utc = span(**evening, location="Asia/Shanghai"), span(**evening)
    moment = at(2026, 3, 2, 14, 30)  # 22:30 in Shanghai (UTC+8)
    assert moment.astimezone(SHANGHAI).hour == 22
    assert shanghai.contains(moment)
    assert not utc.contains(moment)
    assert not shanghai.contains(at(2026, 3, 2, 13, 59))
    assert shanghai.contains(datetime(2026, 3, 2, 22, 30, tzinfo=SHANGHAI))


def test_location_decides_weekday_and_year_too() -> None:
    friday_night_utc = at(2026, 3, 6, 20, 0)  # Saturday 04:00 in Shanghai
    assert span(weekdays=["saturday"], location="Asia/Shanghai").contains(friday_night_utc)
    assert not span(weekdays=["saturday"]).contains(friday_night_utc)
    new_year_in_shanghai = at(2025, 12, 31, 20, 0)
    assert span(years=["2026"], location="Asia/Shanghai").contains(new_year_in_shanghai)
    assert not span(years=["2026"]).contains(new_year_in_shanghai)


@pytest.fixture
def host_in_shanghai(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is POSIX only")
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("host_in_shanghai")  # so that "naive = host time" would be eight hours off
def test_naive_moment_is_taken_as_utc() -> None:
    evening = {"times": [{"start_time": "22:00", "end_time": "23:00"}]}
    assert span(**evening).contains(datetime(2026, 3, 2, 22, 30))
    assert span(**evening, location="Asia/Shanghai").contains(datetime(2026, 3, 2, 14, 30))
    assert not span(**evening, location="Asia/Shanghai").contains(datetime(2026, 3, 2, 22, 30))


@pytest.mark.usefixtures("host_in_shanghai")
def test_location_local_is_the_hosts_zone() -> None:
    local = span(times=[{"start_time": "22:00", "end_time": "23:00"}], location="Local")
    assert local.contains(at(2026, 3, 2, 14, 30))
    assert not local.contains(at(2026, 3, 2, 22, 30))


def test_absent_or_empty_location_is_utc() -> None:
    for location in (None, ""):
        time_range = span(times=[{"start_time": "22:00", "end_time": "23:00"}], location=location)
        assert time_range.location == "UTC"
        assert time_range.contains(at(2026, 3, 2, 22, 30))


# --- weekdays, days of month, months, years ------------------------------------------------------------------


def test_weekday_ranges_and_names_in_mixed_case() -> None:
    time_range = span(weekdays=["Monday:WEDNESDAY", "SunDay"])
    # 2026-03-01 is a Sunday.
    assert [time_range.contains(at(2026, 3, day)) for day in range(1, 8)] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_month_ranges_names_and_numbers() -> None:
    time_range = span(months=["FEBRUARY:april", "12"])
    assert [m for m in range(1, 13) if time_range.contains(at(2026, m, 10))] == [2, 3, 4, 12]
    assert [m for m in range(1, 13) if span(months=["1:3", "October"]).contains(at(2026, m, 10))] == [1, 2, 3, 10]


def test_negative_days_in_february_of_leap_and_common_years() -> None:
    last_three = span(days_of_month=["-3:-1"])
    assert days_matched(last_three, 2024, 2) == [27, 28, 29]
    assert days_matched(last_three, 2026, 2) == [26, 27, 28]
    last = span(days_of_month=["-1"])
    assert days_matched(last, 2024, 2) == [29]
    assert days_matched(last, 2026, 2) == [28]
    assert days_matched(last, 2026, 4) == [30]


def test_days_past_the_month_end_are_clamped_as_alertmanager_does() -> None:
    assert days_matched(span(days_of_month=["25:31"]), 2026, 2) == [25, 26, 27, 28]
    assert days_matched(span(days_of_month=["30:31"]), 2026, 2) == []  # starts past the end: nothing
    assert days_matched(span(days_of_month=["30:31"]), 2026, 3) == [30, 31]
    # -31 in a 28-day month is before day 1: clamped to the month's start, not into January.
    early = span(days_of_month=["-31:-29"])
    assert days_matched(early, 2026, 1) == [1, 2, 3]
    assert days_matched(early, 2024, 2) == [1]
    assert days_matched(early, 2026, 2) == []


def test_days_from_a_day_to_the_month_end_and_single_days() -> None:
    assert days_matched(span(days_of_month=["25:-1"]), 2026, 4) == [25, 26, 27, 28, 29, 30]
    assert days_matched(span(days_of_month=["1:5", "15", "-3:-1"]), 2024, 2) == [1, 2, 3, 4, 5, 15, 27, 28, 29]


def test_years_single_and_ranges() -> None:
    time_range = span(years=["2025", "2027:2028"])
    assert [y for y in range(2024, 2030) if time_range.contains(at(y, 6, 1))] == [2025, 2027, 2028]


def test_yaml_numbers_are_taken_as_alertmanager_does() -> None:
    time_range = span(days_of_month=[1, 15], months=[12], years=[2026])
    assert time_range.contains(at(2026, 12, 15))
    assert not time_range.contains(at(2026, 12, 16))
    assert not time_range.contains(at(2025, 12, 15))


def test_all_given_fields_must_match() -> None:
    time_range = span(
        times=[{"start_time": "09:00", "end_time": "17:00"}],
        weekdays=["monday:friday"],
        days_of_month=["1:7"],
        months=["march"],
        years=["2026"],
    )
    assert time_range.contains(at(2026, 3, 2, 9, 0))  # Monday
    assert not time_range.contains(at(2026, 3, 2, 17, 0))  # time
    assert not time_range.contains(at(2026, 3, 1, 10, 0))  # Sunday
    assert not time_range.contains(at(2026, 3, 9, 10, 0))  # day of month
    assert not time_range.contains(at(2026, 4, 1, 10, 0))  # month (a Wednesday)
    assert not time_range.contains(at(2027, 3, 1, 10, 0))  # year (a Monday)


def test_contains_uses_the_forms_parsed_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    time_range = span(
        times=[{"start_time": "22:00", "end_time": "23:00"}],
        weekdays=["monday"],
        days_of_month=["-3:-1"],
        months=["march"],
        years=["2026"],
        location="Asia/Shanghai",
    )

    def boom(*_: Any) -> Any:
        raise AssertionError("parsed on a call")

    for name in ("_weekday_range", "_day_range", "_month_range", "_year_range", "_zone", "_minutes", "_month_days"):
        monkeypatch.setattr(timing, name, boom)
    assert time_range.contains(at(2026, 3, 30, 14, 30))  # Monday 30 March, 22:30 in Shanghai


# --- intervals and active() --------------------------------------------------------------------------------------


def interval(name: str, *ranges: dict[str, Any]) -> TimeInterval:
    return TimeInterval.model_validate({"name": name, "time_intervals": list(ranges)})


def test_interval_contains_when_any_range_does() -> None:
    nights_and_weekends = interval(
        "off-hours", {"times": [{"start_time": "20:00", "end_time": "24:00"}]}, {"weekdays": ["saturday", "sunday"]}
    )
    assert nights_and_weekends.contains(at(2026, 3, 2, 21, 0))  # Monday night
    assert nights_and_weekends.contains(at(2026, 3, 7, 10, 0))  # Saturday morning
    assert not nights_and_weekends.contains(at(2026, 3, 2, 10, 0))  # Monday morning


def test_interval_without_ranges_contains_nothing_but_an_empty_range_everything() -> None:
    # Alertmanager: an interval is in when one of its ranges is; a range's absent fields match all.
    assert not interval("never").contains(at(2026, 3, 2))
    assert interval("always", {}).contains(at(2026, 3, 2))


def test_active_returns_the_first_named_interval_containing_the_moment() -> None:
    intervals = {
        "mornings": interval("mornings", {"times": [{"start_time": "06:00", "end_time": "12:00"}]}),
        "mondays": interval("mondays", {"weekdays": ["monday"]}),
        "march": interval("march", {"months": ["march"]}),
    }
    monday_morning = at(2026, 3, 2, 9, 0)
    assert active(["mornings", "mondays"], intervals, monday_morning) == "mornings"
    assert active(["mondays", "mornings"], intervals, monday_morning) == "mondays"
    assert active(["mornings", "mondays"], intervals, at(2026, 3, 3, 15, 0)) is None
    assert active(["mornings", "march"], intervals, at(2026, 3, 3, 15, 0)) == "march"
    assert active([], intervals, monday_morning) is None


def test_active_refuses_an_unknown_name() -> None:
    with pytest.raises(KeyError, match="nights"):
        active(["nights"], {}, at(2026, 3, 2))


def test_the_documented_example_loads_from_yaml() -> None:
    doc = load_yaml(
        Path("config.yaml"),
        """
- name: maintenance
  time_intervals:
    - times: [{start_time: "22:00", end_time: "23:00"}]
      weekdays: ["monday:friday", "sunday"]
      days_of_month: ["1:5", "-3:-1", "15"]
      months: ["january:march", "12"]
      years: ["2026:2027"]
      location: Asia/Shanghai
""",
    )
    (maintenance,) = TypeAdapter(tuple[TimeInterval, ...]).validate_python(doc)
    assert maintenance.contains(at(2026, 1, 5, 14, 30))  # Monday 5 January, 22:30 in Shanghai
    assert not maintenance.contains(at(2026, 1, 10, 14, 30))  # Saturday 10 January: not day 1-5/15/last three
    assert not maintenance.contains(at(2026, 4, 1, 14, 30))  # April
    assert not maintenance.contains(at(2028, 1, 3, 14, 30))  # 2028, a Monday


# --- validation errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "loc", "says"),
    [
        # times: format, order, YAML's base-60 numbers
        ({"times": [{"start_time": "9:00", "end_time": "17:00"}]}, ("times", 0, "start_time"), "write HH:MM"),
        ({"times": [{"start_time": "09:00", "end_time": "25:00"}]}, ("times", 0, "end_time"), '"25:00" is not a time'),
        ({"times": [{"start_time": "09:60", "end_time": "17:00"}]}, ("times", 0, "start_time"), "is not a time"),
        ({"times": [{"start_time": "09:00", "end_time": "24:01"}]}, ("times", 0, "end_time"), "is not a time"),
        ({"times": [{"start_time": "noon", "end_time": "17:00"}]}, ("times", 0, "start_time"), "is not a time"),
        ({"times": [{"start_time": "22:00", "end_time": "22:00"}]}, ("times", 0), "an empty range"),
        ({"times": [{"start_time": "23:00", "end_time": "01:00"}]}, ("times", 0), '"23:00" to "24:00" and "00:00"'),
        ({"times": [{"start_time": "22:00", "end_time": "00:00"}]}, ("times", 0), 'write "24:00"'),
        ({"times": [{"start_time": "24:00", "end_time": "24:00"}]}, ("times", 0, "start_time"), "end of the day"),
        (
            {"times": [{"start_time": 1320, "end_time": "23:00"}]},
            ("times", 0, "start_time"),
            'quote it: start_time: "22:00"',
        ),
        ({"times": [{"start_time": "22:00"}]}, ("times", 0, "end_time"), "Field required"),
        # weekdays
        ({"weekdays": ["mon"]}, ("weekdays", 0), '"mon" is not a weekday; write monday…sunday'),
        ({"weekdays": ["monday", "funday:friday"]}, ("weekdays", 1), '"funday" (in "funday:friday") is not a weekday'),
        ({"weekdays": ["friday:monday"]}, ("weekdays", 0), '"friday:saturday" and "sunday:monday"'),
        ({"weekdays": ["monday:wednesday:friday"]}, ("weekdays", 0), "more than one colon"),
        ({"weekdays": [{"monday": "friday"}]}, ("weekdays", 0), 'drop the space after the colon: "monday:friday"'),
        # days_of_month: range and order, Alertmanager's checks
        ({"days_of_month": ["0"]}, ("days_of_month", 0), "0 is not a day of the month; write 1…31"),
        ({"days_of_month": ["32"]}, ("days_of_month", 0), "32 is not a day of the month"),
        ({"days_of_month": ["-32:-1"]}, ("days_of_month", 0), "-32 is not a day of the month"),
        ({"days_of_month": ["1:0"]}, ("days_of_month", 0), "0 is not a day of the month"),
        ({"days_of_month": ["first"]}, ("days_of_month", 0), '"first" is not a day of the month'),
        ({"days_of_month": ["5:3"]}, ("days_of_month", 0), 'ends before it starts; write "3:5"'),
        ({"days_of_month": ["-1:-3"]}, ("days_of_month", 0), 'ends before it starts; write "-3:-1"'),
        ({"days_of_month": ["-3:5"]}, ("days_of_month", 0), "make both days negative"),
        ({"days_of_month": ["28:-1"]}, ("days_of_month", 0), '"28:31" runs to the end'),
        ({"days_of_month": [65]}, ("days_of_month", 0), 'unquoted 1:5 as the number 65; quote it: "1:5"'),
        # months
        ({"months": ["jan"]}, ("months", 0), '"jan" is not a month; write january…december or 1…12'),
        ({"months": ["13"]}, ("months", 0), '"13" is not a month'),
        ({"months": ["0:3"]}, ("months", 0), '"0" (in "0:3") is not a month'),
        ({"months": ["november:february"]}, ("months", 0), '"november:december" and "january:february"'),
        ({"months": ["5:2"]}, ("months", 0), "runs backwards"),
        # years
        ({"years": ["26"]}, ("years", 0), '"26" is not a year; write a 4-digit year'),
        ({"years": ["20260"]}, ("years", 0), "is not a year"),
        ({"years": ["2027:2026"]}, ("years", 0), 'ends before it starts; write "2026:2027"'),
        # location
        ({"location": "Mars/Olympus_Mons"}, ("location",), '"Mars/Olympus_Mons" is not an IANA time zone'),
        ({"location": "Asia/Shangai"}, ("location",), 'did you mean "Asia/Shanghai"?'),
        ({"location": "asia/shanghai"}, ("location",), 'did you mean "Asia/Shanghai"?'),
        ({"location": "local"}, ("location",), 'did you mean "Local"?'),
        ({"location": "../etc/passwd"}, ("location",), "is not an IANA time zone"),
        # empty lists would silently never match; misspelt keys are not ignored
        ({"weekdays": []}, ("weekdays",), "leave weekdays out to match every day of the week"),
        ({"times": []}, ("times",), "leave times out"),
        ({"weekday": ["monday"]}, ("weekday",), "Extra inputs are not permitted"),
    ],
)
def test_validation_errors_say_what_to_write(fields: dict[str, Any], loc: tuple[int | str, ...], says: str) -> None:
    got_loc, message = error_of(fields)
    assert got_loc == loc
    assert says in message


def test_interval_needs_a_name() -> None:
    with pytest.raises(ValidationError, match="give the interval a name"):
        TimeInterval(name=" ")


def test_fields_keep_what_was_written() -> None:
    # Entries are validated but kept as written, so dumps and explanations show the config's own words.
    time_range = span(weekdays=["Monday:FRIDAY"], days_of_month=[15], location="Asia/Shanghai")
    assert time_range.weekdays == ("Monday:FRIDAY",)
    assert time_range.days_of_month == ("15",)
    assert time_range.location == "Asia/Shanghai"
