"""Period arithmetic, pure: calendar days, weeks and months in a time zone, across DST and short months."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing_service.allowances.periods import calendar_anchor, current_period, period_start


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_utc_month_starts_on_the_first_at_midnight_and_ends_on_the_next_first():
    now = utc(2026, 11, 25, 7, 30)
    anchor = calendar_anchor("month", "UTC", now)
    assert anchor == utc(2026, 11, 1)
    assert current_period(anchor, "month", "UTC", now) == (utc(2026, 11, 1), utc(2026, 12, 1))
    assert current_period(anchor, "month", "UTC", utc(2026, 12, 31, 23, 59)) == (utc(2026, 12, 1), utc(2027, 1, 1))


def test_a_week_starts_on_monday_midnight_in_the_allowances_zone():
    # Wednesday 25 Nov 2026, 07:30 UTC; in Kolkata (+05:30) the week began Monday 23 Nov 00:00 IST.
    now = utc(2026, 11, 25, 7, 30)
    anchor = calendar_anchor("week", "Asia/Kolkata", now)
    assert anchor == utc(2026, 11, 22, 18, 30)
    assert current_period(anchor, "week", "Asia/Kolkata", now) == (utc(2026, 11, 22, 18, 30), utc(2026, 11, 29, 18, 30))


def test_a_week_boundary_depends_on_the_zone():
    # Sunday 23:00 UTC is already Monday in Kolkata, still Sunday in Sao Paulo.
    now = utc(2026, 11, 29, 23, 0)
    assert calendar_anchor("week", "Asia/Kolkata", now) == utc(2026, 11, 29, 18, 30)
    assert calendar_anchor("week", "America/Sao_Paulo", now) == utc(2026, 11, 23, 3, 0)


def test_a_sao_paulo_month_starts_at_midnight_minus_three():
    now = utc(2026, 12, 1, 2, 0)  # still 30 November, 23:00, in Sao Paulo
    anchor = calendar_anchor("month", "America/Sao_Paulo", now)
    assert anchor == utc(2026, 11, 1, 3, 0)
    assert current_period(anchor, "month", "America/Sao_Paulo", now) == (utc(2026, 11, 1, 3), utc(2026, 12, 1, 3))


def test_days_across_dst_are_23_and_25_hours_long():
    anchor = datetime(2026, 1, 1, tzinfo=UTC).replace(hour=5)  # midnight EST
    spring = current_period(anchor, "day", "America/New_York", utc(2026, 3, 8, 12))
    assert spring == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))
    assert spring[1] - spring[0] == timedelta(hours=23)
    autumn = current_period(anchor, "day", "America/New_York", utc(2026, 11, 1, 12))
    assert autumn == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))
    assert autumn[1] - autumn[0] == timedelta(hours=25)


@pytest.mark.parametrize(
    ("zone", "now", "day"),
    [
        # Sao Paulo moved its clocks from 00:00 to 01:00 on 4 Nov 2018: that day began at 03:00 UTC, lasted 23 h.
        ("America/Sao_Paulo", utc(2018, 11, 4, 12), (utc(2018, 11, 4, 3), utc(2018, 11, 5, 2))),
        # Santiago does the same on the first Sunday of September.
        ("America/Santiago", utc(2026, 9, 6, 12), (utc(2026, 9, 6, 4), utc(2026, 9, 7, 3))),
    ],
)
def test_a_day_whose_midnight_does_not_exist_starts_when_the_day_begins(zone, now, day):
    anchor = calendar_anchor("day", zone, now)
    assert anchor < day[0]  # the skipped midnight cannot be the anchor: an earlier one that happened is
    assert current_period(anchor, "day", zone, now) == day
    assert current_period(anchor, "day", zone, day[1])[0] == day[1]


def test_a_month_anchored_on_the_31st_clamps_february_without_drifting():
    anchor = utc(2026, 1, 31, 12)
    starts = [period_start(anchor, "month", "UTC", k) for k in range(4)]
    assert starts == [utc(2026, 1, 31, 12), utc(2026, 2, 28, 12), utc(2026, 3, 31, 12), utc(2026, 4, 30, 12)]
    assert period_start(anchor, "month", "UTC", 13) == utc(2027, 2, 28, 12)
    assert period_start(anchor, "month", "UTC", 37) == utc(2029, 2, 28, 12)
    assert period_start(anchor, "month", "UTC", -1) == utc(2025, 12, 31, 12)


@pytest.mark.parametrize("zone", ["UTC", "America/Sao_Paulo", "Asia/Kolkata", "America/New_York", "Europe/London"])
@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_now_is_always_inside_its_period_and_periods_tile_time(zone, period):
    anchor = utc(2025, 3, 30, 0, 30)  # the night London springs forward
    now = anchor - timedelta(days=40)  # before the anchor too: k is negative
    while now < anchor + timedelta(days=400):
        start, end = current_period(anchor, period, zone, now)
        assert start <= now < end
        assert current_period(anchor, period, zone, end)[0] == end  # the next period starts where this one ends
        now += timedelta(hours=37, minutes=11)


def test_the_boundary_instant_belongs_to_the_new_period():
    anchor = utc(2026, 11, 1)
    assert current_period(anchor, "day", "UTC", utc(2026, 11, 5)) == (utc(2026, 11, 5), utc(2026, 11, 6))
    assert current_period(anchor, "day", "UTC", utc(2026, 11, 5) - timedelta(microseconds=1))[0] == utc(2026, 11, 4)


def test_period_zero_starts_exactly_at_the_anchor_even_in_a_repeated_hour():
    # 01:30 EST on 1 Nov 2026 is the second 01:30 of that night in New York.
    anchor = datetime.fromisoformat("2026-11-01T01:30:00-05:00")
    assert period_start(anchor, "day", "America/New_York", 0) == anchor
    assert period_start(anchor, "day", "America/New_York", 1) == datetime.fromisoformat("2026-11-02T01:30:00-05:00")
