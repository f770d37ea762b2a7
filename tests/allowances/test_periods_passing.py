"""A period boundary passing while the service runs: the leading dispatcher grants the next period (every
0.2 s here), with rollover capped, without rollover nothing carries, a stopped allowance grants nothing more,
and tokens reserved by a hold do not roll. One shared boundary a few seconds away keeps the wait short."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from allowances.conftest import credits_of, periods_of
from test_cli import billing

LEAD = 4.0  # seconds from now to the boundary: time to set every case up first


GRANTED = ("capped", "plain", "held")


def test_the_next_period_is_granted_when_the_boundary_passes(granting_server):
    boundary = datetime.now(UTC) + timedelta(seconds=LEAD)
    anchor = (boundary - timedelta(days=1)).isoformat()  # the current 'day' period ends at the boundary
    users = {case: uuid.uuid4() for case in ("capped", "plain", "stopped", "held")}
    with granting_server.client() as http:

        def create(case: str, **terms: Any) -> str:
            body = {"user_id": str(users[case]), "amount": 100, "period": "day", "anchor": anchor, **terms}
            response = http.post("/billing/allowances", json=body)
            assert response.status_code == 201, response.text
            assert datetime.fromisoformat(response.json()["latest_period"]["period_end"]) == boundary
            return str(response.json()["allowance_id"])

        def charge(case: str, amount: int) -> None:
            body = {"user_id": str(users[case]), "amount": amount, "description": "agent run"}
            assert http.post("/billing/charge-tokens", json=body).status_code == 200

        ids = {
            "capped": create("capped", rollover=True, rollover_cap=30),
            "plain": create("plain"),
            "stopped": create("stopped", rollover=True),
            "held": create("held", rollover=True, rollover_cap=1000, timezone="Asia/Kolkata"),
        }
        charge("capped", 40)  # 60 left: 30 roll (the cap)
        charge("plain", 40)  # 60 left: none roll
        assert http.delete(f"/billing/allowances/{ids['stopped']}").status_code == 200
        hold = http.post("/billing/holds", json={"user_id": str(users["held"]), "amount": 30, "description": "run"})
        assert hold.status_code == 201, hold.text
        charge("held", 20)  # 50 left in the grant, 30 more reserved by the hold: 50 roll
        assert datetime.now(UTC) < boundary, "setting up took longer than LEAD; raise it"

        deadline = time.monotonic() + LEAD + 10
        while time.monotonic() < deadline:
            latest = [http.get(f"/billing/allowances/{ids[case]}").json()["latest_period"] for case in GRANTED]
            if all(datetime.fromisoformat(p["period_start"]) == boundary and p["grant_id"] for p in latest):
                break
            time.sleep(0.2)
        time.sleep(0.5)  # let the sweep write the expired grants off too (delay 0, every 0.2 s)

        expected = {"capped": (130, 30, 130), "plain": (100, 0, 100), "held": (150, 50, 150 + 30)}
        for case, (amount, rolled, balance) in expected.items():
            latest = http.get(f"/billing/allowances/{ids[case]}").json()["latest_period"]
            assert (latest["amount"], latest["rolled_over"]) == (amount, rolled), (case, latest)
            assert datetime.fromisoformat(latest["period_end"]) == boundary + timedelta(days=1)
            assert http.get(f"/billing/balance/{users[case]}").json()["balance"] == balance, case
        stopped = http.get(f"/billing/allowances/{ids['stopped']}").json()
        assert datetime.fromisoformat(stopped["latest_period"]["period_end"]) == boundary
        assert http.get(f"/billing/balance/{users['stopped']}").json()["balance"] == 0  # its grant expired
        assert http.post(f"/billing/holds/{hold.json()['hold_id']}/release").status_code == 200

    with psycopg.connect(granting_server.database_url, autocommit=True) as conn:
        for case in ("capped", "plain", "held"):
            assert [row[0] for row in periods_of(conn, ids[case])] == [boundary - timedelta(days=1), boundary]
            assert [count for _, count in credits_of(conn, ids[case])] == [1, 1]
        assert len(periods_of(conn, ids["stopped"])) == 1
    # And the books balance: `billing audit`, allowances included, finds nothing (released hold tokens that
    # came back to the expired grant are written off by the sweep first).
    time.sleep(0.5)
    audit = billing(granting_server.database_url, "audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "no allowance period granted twice" in audit.stdout
