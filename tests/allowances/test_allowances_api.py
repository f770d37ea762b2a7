"""POST/GET/DELETE /billing/allowances over real HTTP: the current period is granted at once with the right
expiry, bad input is a 422 that writes nothing, Idempotency-Key replays, DELETE stops and is idempotent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from allowances.conftest import credits_of, periods_of
from billing_service.allowances import rules as allowances
from billing_service.allowances.periods import calendar_anchor, current_period
from billing_service.grants.rules import audit as grants_audit
from billing_service.ledger import rules as ledger
from conftest import user_jwt


def create(client: Any, user_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
    response = client.post("/billing/allowances", json={"user_id": str(user_id), **fields})
    assert response.status_code == 201, response.text
    return response.json()


def grants_of(client: Any, user_id: uuid.UUID) -> list[dict[str, Any]]:
    response = client.get(f"/billing/grants/{user_id}")
    assert response.status_code == 200, response.text
    return response.json()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("period", "zone"),
    [
        ("month", "UTC"),
        ("week", "UTC"),
        ("day", "America/Sao_Paulo"),
        ("week", "Asia/Kolkata"),
        ("month", "Asia/Kolkata"),
    ],
)
def test_post_grants_the_current_calendar_period_now_expiring_at_its_end(client, user_id, period, zone):
    allowance = create(client, user_id, amount=1000, period=period, timezone=zone)
    now = datetime.now(UTC)
    start, end = current_period(calendar_anchor(period, zone, now), period, zone, now)
    local_start = start.astimezone(ZoneInfo(zone))
    assert (local_start.hour, local_start.minute) == (0, 0)
    assert period != "week" or local_start.weekday() == 0
    assert period != "month" or local_start.day == 1
    latest = allowance["latest_period"]
    assert (at(latest["period_start"]), at(latest["period_end"])) == (start, end)
    assert latest["amount"] == 1000 and latest["rolled_over"] == 0
    assert at(allowance["next_grant_at"]) == end
    [grant] = grants_of(client, user_id)
    assert grant["grant_id"] == latest["grant_id"]
    assert (grant["amount"], grant["remaining"], grant["source"]) == (1000, 1000, "allowance")
    assert (grant["category"], grant["priority"]) == ("promotional", 50)
    assert at(grant["expires_at"]) == end
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 1000


def test_an_explicit_anchor_sets_the_periods_in_its_zone(client, user_id):
    # Anchored on the 31st at 09:00 in Kolkata: months start on the 31st, or the month's last day.
    anchor = datetime(2026, 1, 31, 9, 0, tzinfo=ZoneInfo("Asia/Kolkata"))
    allowance = create(
        client,
        user_id,
        amount=10,
        period="month",
        timezone="Asia/Kolkata",
        anchor=anchor.isoformat(),
        priority=10,
        category="paid",
        description="Pro plan",
    )
    now = datetime.now(UTC)
    start, end = current_period(anchor, "month", "Asia/Kolkata", now)
    assert start <= now < end
    local = start.astimezone(ZoneInfo("Asia/Kolkata"))
    assert (local.hour, local.minute) == (9, 0) and local.day in (28, 29, 30, 31)
    assert at(allowance["latest_period"]["period_start"]) == start
    [grant] = grants_of(client, user_id)
    assert (grant["priority"], grant["category"], at(grant["expires_at"])) == (10, "paid", end)
    [row] = client.get(f"/billing/transactions/{user_id}").json()
    assert row["description"] == "Pro plan"


BAD_BODIES = [
    ({"period": "year"}, "period"),
    ({"period": "Day"}, "period"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ({"timezone": "../../etc/passwd"}, "timezone"),
    ({"timezone": ""}, "timezone"),
    ({"anchor": "2026-01-01T00:00:00"}, "anchor"),
    ({"anchor": "2026-01-01"}, "anchor"),
    ({"anchor": "1066-10-14T09:00:00+00:00"}, "anchor"),
    ({"anchor": 1767225600}, "anchor"),
    ({"amount": 0}, "amount"),
    ({"amount": -5}, "amount"),
    ({"amount": 1.5}, "amount"),
    ({"amount": "100"}, "amount"),
    ({"amount": 2**53}, "amount"),
    ({"rollover": True, "rollover_cap": -1}, "rollover_cap"),
    ({"rollover_cap": 10}, "rollover_cap needs rollover"),
    ({"rollover": True, "amount": 2**53 - 1}, "rollover_cap"),
    ({"rollover": "yes"}, "rollover"),
    ({"priority": 101}, "priority"),
    ({"category": "gold"}, "category"),
    ({"description": ""}, "description"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("change", "named"), BAD_BODIES)
def test_bad_input_is_a_422_with_a_code_and_writes_nothing(client, db, user_id, change, named):
    body = {"user_id": str(user_id), "amount": 100, "period": "day", **change}
    response = client.post("/billing/allowances", json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "validation_error" and named in answer["detail"], answer
    assert db.execute("SELECT count(*) FROM allowances WHERE user_id = %s", (user_id,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM accounts WHERE user_id = %s", (user_id,)).fetchone() == (0,)


def test_a_missing_body_field_and_garbage_json_are_422(client, user_id):
    response = client.post("/billing/allowances", json={"user_id": str(user_id), "amount": 100})
    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    response = client.post("/billing/allowances", content=b"{nope", headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()["code"]) == (422, "invalid_json")


def test_a_retry_with_the_same_key_replays_and_grants_once(client, db, user_id):
    body = {"user_id": str(user_id), "amount": 70, "period": "week", "rollover": True}
    headers = {"Idempotency-Key": f"plan-{user_id}"}
    first = client.post("/billing/allowances", json=body, headers=headers)
    second = client.post("/billing/allowances", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert first.json() == second.json()
    assert first.json()["rollover_cap"] == 70  # rollover without a cap: one period's amount
    other = client.post("/billing/allowances", json={**body, "amount": 71}, headers=headers)
    assert (other.status_code, other.json()["code"]) == (422, "idempotency_key_reused")
    assert db.execute("SELECT count(*) FROM allowances WHERE user_id = %s", (user_id,)).fetchone() == (1,)
    assert [count for _, count in credits_of(db, first.json()["allowance_id"])] == [1]
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 70


def test_get_list_and_delete(client, db, user_id):
    first = create(client, user_id, amount=5, period="day")
    second = create(client, user_id, amount=6, period="month", timezone="Asia/Kolkata")
    assert client.get(f"/billing/allowances/{first['allowance_id']}").json() == first
    listed = client.get("/billing/allowances", params={"user_id": str(user_id)}).json()
    assert [a["allowance_id"] for a in listed] == [first["allowance_id"], second["allowance_id"]]
    assert client.get("/billing/allowances", params={"user_id": str(uuid.uuid4())}).json() == []

    stopped = client.delete(f"/billing/allowances/{first['allowance_id']}")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["stopped_at"] is not None and stopped.json()["next_grant_at"] is None
    again = client.delete(f"/billing/allowances/{first['allowance_id']}")
    assert again.status_code == 200 and again.json() == stopped.json()
    # The current period's grant stays.
    assert client.get(f"/billing/balance/{user_id}").json()["balance"] == 11
    assert len(periods_of(db, first["allowance_id"])) == 1


def test_unknown_allowances_are_404_and_users_read_only_their_own(server, client, user_id):
    missing = uuid.uuid4()
    for response in (client.get(f"/billing/allowances/{missing}"), client.delete(f"/billing/allowances/{missing}")):
        assert (response.status_code, response.json()["code"]) == (404, "allowance_not_found")
    assert client.get("/billing/allowances/not-a-uuid").status_code == 422
    allowance = create(client, user_id, amount=5, period="day")
    with server.client(token=user_jwt(user_id)) as own:
        assert own.get(f"/billing/allowances/{allowance['allowance_id']}").status_code == 200
        assert own.get("/billing/allowances", params={"user_id": str(user_id)}).status_code == 200
        assert own.delete(f"/billing/allowances/{allowance['allowance_id']}").status_code == 403
        assert (
            own.post("/billing/allowances", json={"user_id": str(user_id), "amount": 1, "period": "day"}).status_code
            == 403
        )
    with server.client(token=user_jwt(uuid.uuid4())) as stranger:
        assert stranger.get(f"/billing/allowances/{allowance['allowance_id']}").status_code == 403
        assert stranger.get("/billing/allowances", params={"user_id": str(user_id)}).status_code == 403


def test_an_anchor_in_the_future_still_grants_the_period_running_now(client, user_id):
    anchor = datetime.now(UTC) + timedelta(days=3, hours=5)
    allowance = create(client, user_id, amount=9, period="week", anchor=anchor.isoformat())
    start, end = at(allowance["latest_period"]["period_start"]), at(allowance["latest_period"]["period_end"])
    assert start <= datetime.now(UTC) < end and end == anchor


def test_the_books_of_every_user_with_an_allowance_audit_clean(database_url, db):
    # The shared database also holds other tests' deliberate damage; none of it may touch an allowance user.
    with psycopg.connect(database_url) as conn:
        drifting = {finding.user_id for finding in ledger.audit(conn)[1]}
        drifting |= {user for user, _, _ in grants_audit(conn)}
        assert allowances.audit(conn) == []
    with_allowances = {row[0] for row in db.execute("SELECT DISTINCT user_id FROM allowances")}
    assert with_allowances and not drifting & with_allowances
