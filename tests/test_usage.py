"""Usage provenance: metadata on ledger rows, history filters, the usage rollup, and the indexes behind them."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

from conftest import fund, user_jwt
from test_holds import hold


def charge(client, user_id, amount, **metadata):
    response = client.post(
        "/billing/charge-tokens",
        json={"user_id": str(user_id), "amount": amount, "description": "llm call", "metadata": metadata},
    )
    assert response.status_code == 200, response.text
    return response.json()


def usage(client, user_id, **params):
    response = client.get(f"/billing/usage/{user_id}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_usage_groups_spend_by_run_model_and_day(client, user_id):
    fund(client, user_id, 10_000)
    charge(client, user_id, 100, run_id="run-a", model="small", input_tokens=80, output_tokens=20)
    charge(client, user_id, 300, run_id="run-b", model="large", input_tokens=200, output_tokens=90, cached_tokens=10)
    hold_id = hold(client, user_id, 1000)["hold_id"]
    client.post(
        f"/billing/holds/{hold_id}/capture",
        json={"amount": 50, "metadata": {"run_id": "run-a", "model": "large", "input_tokens": 40, "output_tokens": 10}},
    )
    charge(client, user_id, 7)  # no provenance at all

    by_run = usage(client, user_id, group_by="run_id")
    assert by_run["group_by"] == "run_id"
    rows = {row["group"]: row for row in by_run["groups"]}
    assert set(rows) == {None, "run-a", "run-b"}
    assert (rows["run-a"]["tokens"], rows["run-a"]["transactions"]) == (150, 2)
    assert (rows["run-a"]["input_tokens"], rows["run-a"]["output_tokens"]) == (120, 30)
    assert rows["run-a"]["cached_tokens"] is None
    assert (rows["run-b"]["tokens"], rows["run-b"]["cached_tokens"]) == (300, 10)
    assert rows[None]["tokens"] == 7

    by_model = {row["group"]: row["tokens"] for row in usage(client, user_id, group_by="model")["groups"]}
    assert by_model == {None: 7, "small": 100, "large": 350}

    by_day = usage(client, user_id, group_by="day")["groups"]
    assert [row["group"] for row in by_day] == [datetime.now(UTC).strftime("%Y-%m-%d")]
    assert by_day[0]["tokens"] == 457  # credits are not spend


def test_usage_is_limited_to_the_time_window(client, user_id):
    fund(client, user_id, 1000)
    charge(client, user_id, 10, run_id="early")
    time.sleep(0.05)
    middle = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    charge(client, user_id, 20, run_id="late")
    after = {row["group"] for row in usage(client, user_id, group_by="run_id", since=middle)["groups"]}
    before = {row["group"] for row in usage(client, user_id, group_by="run_id", until=middle)["groups"]}
    assert (after, before) == ({"late"}, {"early"})


def test_usage_is_readable_by_its_user_and_validated(server, client, user_id):
    fund(client, user_id, 100)
    with server.client(token=user_jwt(user_id)) as own:
        assert own.get(f"/billing/usage/{user_id}", params={"group_by": "day"}).status_code == 200
    with server.client(token=user_jwt(uuid.uuid4())) as stranger:
        assert stranger.get(f"/billing/usage/{user_id}", params={"group_by": "day"}).status_code == 403
    for params in ({}, {"group_by": "week"}, {"group_by": "day", "since": "2026-01-01T00:00:00"}):
        response = client.get(f"/billing/usage/{user_id}", params=params)
        assert response.status_code == 422, params
        assert response.json()["code"] == "validation_error"
    missing = client.get(f"/billing/usage/{uuid.uuid4()}", params={"group_by": "day"})
    assert missing.status_code == 404


def test_metadata_token_counts_must_be_integers(client, user_id):
    fund(client, user_id, 100)
    for metadata in ({"input_tokens": 1.5}, {"output_tokens": -1}, {"cached_tokens": True}, {"run_id": 7}):
        response = client.post(
            "/billing/charge-tokens",
            json={"user_id": str(user_id), "amount": 1, "description": "x", "metadata": metadata},
        )
        assert response.status_code == 422, metadata


def test_history_filters_by_run_type_and_time(client, user_id):
    fund(client, user_id, 1000)
    charge(client, user_id, 10, run_id="r1")
    time.sleep(0.05)
    middle = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    charge(client, user_id, 20, run_id="r2")
    hold_id = hold(client, user_id, 100)["hold_id"]
    client.post(f"/billing/holds/{hold_id}/capture", json={"amount": 30, "metadata": {"run_id": "r1"}})

    def amounts(**params):
        response = client.get(f"/billing/transactions/{user_id}", params=params)
        assert response.status_code == 200, response.text
        return [row["amount"] for row in response.json()]

    assert amounts(run_id="r1") == [-30, -10]
    assert amounts(run_id="r1", limit=1) == [-30]
    assert amounts(type="capture") == [-30]
    assert amounts(type="credit") == [1000]
    assert amounts(since=middle) == [-30, -20]
    assert amounts(until=middle) == [-10, 1000]
    assert amounts(run_id="r1", since=middle, type="capture") == [-30]
    assert client.get(f"/billing/transactions/{user_id}", params={"type": "transfer"}).status_code == 422
    assert client.get(f"/billing/transactions/{user_id}", params={"run_id": "a\x00b"}).status_code == 422
    assert client.get(f"/billing/transactions/{user_id}", params={"since": "2026-01-01T00:00:00"}).status_code == 422

    page = client.get(f"/billing/transactions/{user_id}", params={"run_id": "r1", "limit": 1})
    next_page = client.get(page.headers["Link"].split(">")[0].lstrip("<"))
    assert [row["amount"] for row in next_page.json()] == [-10]


def explain(db, statement, params):
    """The plan PostgreSQL picks when a sequential scan is priced out: proves an index can serve the query."""
    with db.transaction():
        db.execute("SET LOCAL enable_seqscan = off")
        rows = db.execute(f"EXPLAIN (FORMAT JSON) {statement}", params).fetchone()[0]
    return json.dumps(rows)


def test_usage_history_and_balance_at_are_served_by_indexes(db, client, user_id):
    from billing_service.ledger import sql

    fund(client, user_id, 10)
    params = {
        "user_id": user_id,
        "since": datetime(2000, 1, 1, tzinfo=UTC),
        "until": datetime(3000, 1, 1, tzinfo=UTC),
        "at": datetime.now(UTC),
        "run_id": "r1",
        "before_seq": 2**62,
        "limit": 10,
    }
    for name, statement in (
        ("usage by run", sql.usage("run_id")),
        ("usage by model", sql.usage("model")),
        ("usage by day", sql.usage("day")),
        ("history by run", sql.filtered_history(sql.HISTORY_PAGE, ["run_id"])),
        ("history by time", sql.filtered_history(sql.HISTORY_PAGE, ["since", "until"])),
    ):
        plan = explain(db, statement, params)
        # Any index led by user_id reads only this user's rows; which one wins depends on the statistics.
        assert '"Seq Scan"' not in plan, (name, plan)
        assert '"Index Cond": "((user_id = ' in plan or '"Index Cond": "(user_id = ' in plan, (name, plan)
    plan = explain(db, sql.BALANCE_AT, params)
    assert "transactions_user_created_at" in plan, plan
