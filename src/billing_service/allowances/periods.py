"""Calendar periods of an allowance: pure arithmetic, no I/O.

Period k of an allowance starts at `anchor + k periods`, counted on the wall clock of the allowance's time
zone (a day is a calendar day, 23 or 25 hours across a DST change; a month keeps the anchor's day of month,
clamped to the month's last day: an anchor on the 31st starts February's period on the 28th or 29th). Each
start is computed from the anchor, never from the previous start, so a clamp in February does not move
March's start. A wall time that does not exist (a DST gap) resolves as zoneinfo does with fold=0: the offset
in force before the change.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["day", "week", "month"]


def _shift(local: datetime, period: Period, k: int) -> datetime:
    """`local` (an aware wall time in its zone) moved by k periods on the wall clock."""
    if period == "day":
        return local + timedelta(days=k)  # same tzinfo: wall-clock arithmetic, the offset is recomputed
    if period == "week":
        return local + timedelta(weeks=k)
    months = local.year * 12 + (local.month - 1) + k
    year, month = divmod(months, 12)
    month += 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


def period_start(anchor: datetime, period: Period, zone: str, k: int) -> datetime:
    """The start of period k (k may be negative), in UTC."""
    if k == 0:
        return anchor.astimezone(UTC)  # exactly, even in a repeated hour (wall-clock arithmetic resets fold)
    local = anchor.astimezone(ZoneInfo(zone))
    return _shift(local, period, k).astimezone(UTC)


def period_index(anchor: datetime, period: Period, zone: str, now: datetime) -> int:
    """The k whose period contains `now`: start(k) <= now < start(k + 1)."""
    tz = ZoneInfo(zone)
    local_anchor, local_now = anchor.astimezone(tz), now.astimezone(tz)
    if period == "month":
        k = (local_now.year - local_anchor.year) * 12 + local_now.month - local_anchor.month
    else:
        k = (now - anchor) // timedelta(days=1 if period == "day" else 7)
    # The estimate is off by at most one (DST hours, a clamped day of month): settle it exactly.
    while period_start(anchor, period, zone, k) > now:
        k -= 1
    while period_start(anchor, period, zone, k + 1) <= now:
        k += 1
    return k


def current_period(anchor: datetime, period: Period, zone: str, now: datetime) -> tuple[datetime, datetime]:
    """(start, end) in UTC of the period that contains `now`; the end is the next period's start."""
    k = period_index(anchor, period, zone, now)
    return period_start(anchor, period, zone, k), period_start(anchor, period, zone, k + 1)


def _exists(local: datetime) -> bool:
    """Whether a wall time happens in its zone (not skipped by a DST change)."""
    return local.astimezone(UTC).astimezone(local.tzinfo).replace(tzinfo=None) == local.replace(tzinfo=None)


def calendar_anchor(period: Period, zone: str, now: datetime) -> datetime:
    """A calendar start (midnight; Monday midnight; the 1st at midnight) at or before `now` in `zone`, in UTC.

    Usually the current period's. Periods repeat the anchor's wall time, so where that midnight was skipped
    by a DST change (Chile, and Brazil until 2019, change clocks at midnight) the anchor is an earlier
    midnight that did happen: the skipped one then still starts its day, at the instant the day began."""
    local = now.astimezone(ZoneInfo(zone))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if period == "week":
        midnight -= timedelta(days=local.weekday())
    elif period == "month":
        midnight = midnight.replace(day=1)
    for k in range(0, -12, -1):
        candidate = _shift(midnight, period, k)
        if _exists(candidate):
            return candidate.astimezone(UTC)
    return midnight.astimezone(UTC)  # no zone skips a year of midnights; this line only bounds the loop
