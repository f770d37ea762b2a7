"""The capture batcher (BILLING_BATCH_CAPTURES): plain captures share commits and decide exactly as one at a time.

The differential test runs one workload (three grants of different priorities and expiries, a tree of three
holds, 45 captures fired at once) through a batching server and through a server with one transaction per
capture, each on accounts of its own, and asserts that everything the order of arrival cannot change comes out
identical: answers, balances, held, the grants' slots, the trees' allocations, what each grant paid. The other
tests drive the cases the batch hands to the single-capture path (refusals, keys, a lease to sweep, a key raced
by a plain charge) and check that they still answer exactly.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from conftest import LiveServer, fund, ledger_state, start_server, stop_server
from test_metrics import scrape_until, value

# Small pools and no dispatcher: these servers share the database server's connection limit (100 by default)
# with the suite's session server, and nothing here needs webhooks or the sweeper (the single path sweeps).
_SMALL_POOL = {"BILLING_POOL_MAX_SIZE": "6", "BILLING_DISPATCHER": "false"}


@pytest.fixture(scope="module")
def batching(database_url: str) -> Iterator[LiveServer]:
    # Small batches, so 45 captures at once make several batches of several captures each.
    live = start_server(
        database_url, workers=2, BILLING_BATCH_CAPTURES="true", BILLING_BATCH_MAX_SIZE="16", **_SMALL_POOL
    )
    yield live
    stop_server(live.process)


@pytest.fixture
def one_at_a_time(database_url: str) -> Iterator[LiveServer]:
    live = start_server(database_url, workers=2, BILLING_BATCH_CAPTURES="false", **_SMALL_POOL)
    yield live
    stop_server(live.process)


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _post(http: httpx.Client, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _post_all(server: LiveServer, requests: list[tuple[str, dict[str, Any], str | None]]) -> list[httpx.Response]:
    async with server.async_client(limits=httpx.Limits(max_connections=100)) as http:
        return await asyncio.gather(
            *(
                http.post(path, json=body, headers={"Idempotency-Key": key} if key else {})
                for path, body, key in requests
            )
        )


def _audit(server: LiveServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "billing_service", "audit"], env=server.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


HOLD_DESCRIPTIONS = {"root": "run", "child": "sub", "grandchild": "subsub"}


def _workload(server: LiveServer) -> dict[str, Any]:
    """Three grants, a root hold with a child and a grandchild, then 45 captures at once. Checks what every answer
    and row must say whatever the order, and returns what the order cannot change, grants and holds named by
    their role."""
    user = uuid.uuid4()
    with server.client() as http:
        promotional = {"priority": 10, "category": "promotional"}
        grants = {
            "trial": _post(
                http,
                "/billing/credit-tokens",
                {"user_id": str(user), "amount": 120, "description": "trial", **promotional, "expires_at": _in(86_400)},
            )["grant_id"],
            "bought": _post(
                http, "/billing/credit-tokens", {"user_id": str(user), "amount": 500, "description": "bought"}
            )["grant_id"],
            "bonus": _post(
                http,
                "/billing/credit-tokens",
                {"user_id": str(user), "amount": 60, "description": "bonus", **promotional, "expires_at": _in(3_600)},
            )["grant_id"],
        }
        root = _post(http, "/billing/holds", {"user_id": str(user), "amount": 400, "description": "run"}, 201)
        child = _post(http, f"/billing/holds/{root['hold_id']}/children", {"amount": 120, "description": "sub"}, 201)
        grandchild = _post(
            http, f"/billing/holds/{child['hold_id']}/children", {"amount": 50, "description": "subsub"}, 201
        )
    holds = {"root": root["hold_id"], "child": child["hold_id"], "grandchild": grandchild["hold_id"]}
    requests: list[tuple[str, dict[str, Any], str | None]] = []
    for n in range(30):  # amounts 1..7 in turn: 115 in all, within the root's 280
        body: dict[str, Any] = {"amount": 1 + n % 7}
        if n % 3 == 0:
            body["description"] = f"step {n}"
        if n % 4 == 0:
            body["metadata"] = {"run_id": "run-1", "model": "m", "input_tokens": n, "output_tokens": 1}
        requests.append((f"/billing/holds/{holds['root']}/capture", body, f"root-{n}" if n % 2 else None))
    # 10 x 9 against the child's 70, and 5 x 13 against the grandchild's 50: 7 and 3 fit, whichever come first.
    requests += [(f"/billing/holds/{holds['child']}/capture", {"amount": 9}, None) for _ in range(10)]
    requests += [(f"/billing/holds/{holds['grandchild']}/capture", {"amount": 13}, None) for _ in range(5)]
    responses = asyncio.run(_post_all(server, requests))

    with psycopg.connect(server.database_url, autocommit=True) as db:
        rows = db.execute(
            "SELECT id::text, seq, amount, balance_after, hold_id::text, funding, description, metadata "
            "FROM transactions WHERE user_id = %s AND type = 'capture' ORDER BY seq",
            (user,),
        ).fetchall()
        balance, held, last_event_seq, slots = db.execute(
            "SELECT balance, held, last_event_seq,"
            " (SELECT array_agg(ARRAY[u.grant_id::text, u.remaining::text] ORDER BY u.n)"
            " FROM unnest(grants) WITH ORDINALITY AS u(grant_id, remaining, priority, expires_at, created_at, n))"
            " FROM accounts WHERE user_id = %s",
            (user,),
        ).fetchone()
        allocation = db.execute(
            "SELECT grant_id::text, amount FROM hold_funding WHERE user_id = %s AND root_id = %s",
            (user, root["hold_id"]),
        ).fetchall()
        events = db.execute("SELECT seq, type, data FROM events WHERE user_id = %s ORDER BY seq", (user,)).fetchall()
        tree = {
            role: db.execute("SELECT remaining, captured, status FROM holds WHERE id = %s", (hold_id,)).fetchone()
            for role, hold_id in holds.items()
        }
        assert ledger_state(db, user)[:2] == (balance, balance)

    role_of_grant = {grant_id: role for role, grant_id in grants.items()}
    role_of_hold = {hold_id: role for role, hold_id in holds.items()}
    # The ledger is a chain: seq without gaps, each balance_after the previous one's plus the row's amount.
    assert [row[1] for row in rows] == list(range(rows[0][1], rows[0][1] + len(rows)))
    running = 680  # the three credits; a hold posts nothing
    for row in rows:
        running += row[2]
        assert row[3] == running
    # Per hold, in seq order, what it had left after each of its captures.
    left = {holds["root"]: 400 - 120, holds["child"]: 120 - 50, holds["grandchild"]: 50}
    remaining_after = {}
    for row in rows:
        left[row[4]] += row[2]
        remaining_after[row[0]] = left[row[4]]
    by_id = {row[0]: row for row in rows}
    answers: Counter[tuple[str, int, str | None]] = Counter()
    for (path, body, _), response in zip(requests, responses, strict=True):
        role = role_of_hold[path.split("/")[3]]
        if response.status_code != 200:
            answers[(role, response.status_code, response.json()["code"])] += 1
            continue
        answers[(role, 200, None)] += 1
        answer = response.json()
        row = by_id[answer["transaction_id"]]
        # Each answer is its own row's: its balance_after, and its hold as this capture (not its batch) left it.
        assert (answer["balance"], answer["hold"]["remaining"]) == (row[3], remaining_after[row[0]])
        assert (row[4], -row[2]) == (holds[role], body["amount"])
        assert (row[6], row[7]) == (body.get("description", HOLD_DESCRIPTIONS[role]), body.get("metadata"))
    # Events: numbered without gaps; each capture's transaction.posted carries its ledger row.
    assert [event[0] for event in events] == list(range(1, last_event_seq + 1))
    posted = {event[2]["id"]: event[2] for event in events if event[1] == "transaction.posted"}
    for row in rows:
        data = posted[row[0]]
        assert (data["amount"], data["balance_after"], data["hold_id"], data["funding"]) == (
            row[2],
            row[3],
            row[4],
            row[5],
        )
    paid_by: Counter[str] = Counter()
    for row in rows:
        for entry in row[5]:
            paid_by[role_of_grant[entry["grant_id"]]] += entry["amount"]
    return {
        "answers": answers,
        "account": (balance, held, len(rows)),
        "slots": [(role_of_grant[grant_id], int(amount)) for grant_id, amount in slots or []],
        "allocation": sorted((role_of_grant[grant_id], amount) for grant_id, amount in allocation),
        "tree": tree,
        "paid_by": paid_by,
    }


def test_a_batch_decides_every_capture_exactly_as_one_at_a_time(batching, one_at_a_time):
    batched = _workload(batching)
    assert batched == _workload(one_at_a_time)
    assert batched["answers"] == {
        ("root", 200, None): 30,
        ("child", 200, None): 7,
        ("child", 409, "capture_exceeds_hold"): 3,
        ("grandchild", 200, None): 3,
        ("grandchild", 409, "capture_exceeds_hold"): 2,
    }
    captured = 115 + 63 + 39
    assert batched["account"] == (680 - captured, 400 - captured, 40)
    assert batched["tree"] == {
        "root": (280 - 115, 115, "active"),
        "child": (70 - 63, 63, "active"),
        "grandchild": (50 - 39, 39, "active"),
    }
    # The tree reserved 400 in the grants' order (the bonus expires first, then the trial, then bought) and its
    # captures spent that reservation in the same order.
    assert batched["paid_by"] == {"bonus": 60, "trial": 120, "bought": captured - 180}
    assert batched["allocation"] == [("bonus", 0), ("bought", 220 - (captured - 180)), ("trial", 0)]
    assert batched["slots"] == [("bought", 280)]
    _audit(batching)
    # The batches really held several captures each.
    samples = scrape_until(batching.base_url, lambda s: value(s, "billing_capture_batch_size_sum") >= 40)
    assert value(samples, "billing_capture_batch_size_count") < value(samples, "billing_capture_batch_size_sum")


def _capture_all(server: LiveServer, hold_id: str, bodies: list[dict[str, Any]], keys: list[str | None]) -> list:
    path = f"/billing/holds/{hold_id}/capture"
    return asyncio.run(_post_all(server, [(path, body, key) for body, key in zip(bodies, keys, strict=True)]))


def _new_hold(server: LiveServer, amount: int, **extra: Any) -> tuple[uuid.UUID, str]:
    user = uuid.uuid4()
    with server.client() as http:
        fund(http, user, 1000)
        body = {"user_id": str(user), "amount": amount, "description": "run", **extra}
        return user, _post(http, "/billing/holds", body, 201)["hold_id"]


def test_captures_in_flight_together_never_exceed_the_hold(batching, db):
    user, hold_id = _new_hold(batching, 50)
    responses = _capture_all(batching, hold_id, [{"amount": 1}] * 200, [None] * 200)
    assert Counter(response.status_code for response in responses) == {200: 50, 409: 150}
    assert {response.json()["code"] for response in responses if response.status_code == 409} == {
        "capture_exceeds_hold"
    }
    ok = [response.json() for response in responses if response.status_code == 200]
    assert sorted(answer["hold"]["remaining"] for answer in ok) == list(range(50))
    assert sorted(answer["balance"] for answer in ok) == list(range(950, 1000))
    assert ledger_state(db, user) == (950, 950, 51)
    assert db.execute("SELECT held FROM accounts WHERE user_id = %s", (user,)).fetchone()[0] == 0


def test_one_key_in_flight_many_times_captures_once(batching, db):
    user, hold_id = _new_hold(batching, 500)
    responses = _capture_all(batching, hold_id, [{"amount": 5, "description": "same"}] * 40, ["step-1"] * 40)
    assert {response.status_code for response in responses} == {200}
    assert len({response.json()["transaction_id"] for response in responses}) == 1
    assert sum(response.headers.get("Idempotent-Replayed") == "true" for response in responses) == 39
    assert ledger_state(db, user) == (995, 995, 2)
    # A retry long after: the batch sees the spent key and hands it to the single path, which replays.
    again = _capture_all(batching, hold_id, [{"amount": 5, "description": "same"}], ["step-1"])[0]
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["transaction_id"] == responses[0].json()["transaction_id"]
    other = _capture_all(batching, hold_id, [{"amount": 6, "description": "same"}], ["step-1"])[0]
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert ledger_state(db, user) == (995, 995, 2)


def test_one_key_with_two_bodies_in_one_batch_is_taken_by_one(batching, db):
    user, hold_id = _new_hold(batching, 500)
    bodies = [{"amount": 5}, {"amount": 6}] * 10
    responses = _capture_all(batching, hold_id, bodies, ["k"] * 20)
    codes = Counter(
        response.json().get("code", "ok") if response.status_code != 200 else "ok" for response in responses
    )
    assert codes == {"ok": 10, "idempotency_key_reused": 10}
    balance, ledger_sum, rows = ledger_state(db, user)
    assert rows == 2 and balance == ledger_sum and balance in (995, 994)


def test_an_unknown_hold_and_a_closed_one_do_not_fail_their_batch(batching, db):
    user, live = _new_hold(batching, 100)
    _, closed = _new_hold(batching, 100)
    with batching.client() as http:
        _post(http, f"/billing/holds/{closed}/release", {})
    unknown = str(uuid.uuid4())
    requests = [(f"/billing/holds/{hold_id}/capture", {"amount": 3}, None) for hold_id in (live, closed, unknown) * 8]
    responses = asyncio.run(_post_all(batching, requests))
    outcomes = Counter((response.status_code, response.json().get("code")) for response in responses)
    assert outcomes == {(200, None): 8, (409, "hold_not_active"): 8, (404, "hold_not_found"): 8}
    assert ledger_state(db, user) == (1000 - 24, 1000 - 24, 9)


def _fallbacks(server: LiveServer) -> float:
    return value(scrape_until(server.base_url, lambda s: True), "billing_capture_batch_fallbacks_total")


def _events(db: psycopg.Connection[Any], user: uuid.UUID) -> list[tuple[str, str | None]]:
    """(event type, its ledger row's type) in seq order."""
    query = "SELECT type, data ->> 'type' FROM events WHERE user_id = %s ORDER BY seq"
    return [(row[0], row[1]) for row in db.execute(query, (user,))]


def test_a_lease_due_in_the_tree_is_swept_before_the_batch_captures(batching, db):
    """The batch never decides past a due lease: it hands the captures to the single path, which expires the child
    first (its tokens go back to the root, and hold.expired comes before the captures' events)."""
    user, root_id = _new_hold(batching, 300)
    with batching.client() as http:
        body = {"amount": 100, "description": "sub", "ttl_seconds": 1}
        child_id = _post(http, f"/billing/holds/{root_id}/children", body, 201)["hold_id"]
    fallbacks = _fallbacks(batching)
    time.sleep(1.5)
    responses = _capture_all(batching, root_id, [{"amount": 10}] * 12, [None] * 12)
    assert {response.status_code for response in responses} == {200}
    with batching.client() as http:
        tree = http.get(f"/billing/holds/{root_id}").json()
    assert tree["children"][0]["hold_id"] == child_id and tree["children"][0]["status"] == "expired"
    # The child's 100 went back to the root before the captures took 120.
    assert (tree["remaining"], tree["captured"]) == (300 - 100 + 100 - 120, 120)
    events = _events(db, user)
    assert events.index(("hold.expired", None)) < events.index(("transaction.posted", "capture"))
    assert ledger_state(db, user) == (1000 - 120, 1000 - 120, 13)
    _audit(batching)
    assert value(scrape_until(batching.base_url, lambda s: value(s, _FALLBACKS) > fallbacks), _FALLBACKS) > fallbacks


def test_a_grant_due_is_expired_before_the_batch_captures(batching, db):
    """An account with a grant due: the single path writes the expiry row first, so every capture's balance_after
    is exact."""
    user = uuid.uuid4()
    with batching.client() as http:
        fund(http, user, 1000)
        short = {"priority": 10, "category": "promotional", "expires_at": _in(1)}
        _post(http, "/billing/credit-tokens", {"user_id": str(user), "amount": 400, "description": "short", **short})
        # The hold reserves 300 of the short grant (reserved tokens stay the run's); its other 100 expire.
        root_id = _post(http, "/billing/holds", {"user_id": str(user), "amount": 300, "description": "run"}, 201)[
            "hold_id"
        ]
    fallbacks = _fallbacks(batching)
    time.sleep(1.5)
    responses = _capture_all(batching, root_id, [{"amount": 10}] * 12, [None] * 12)
    assert {response.status_code for response in responses} == {200}
    rows = db.execute("SELECT type, amount, balance_after FROM transactions WHERE user_id = %s ORDER BY seq", (user,))
    assert rows.fetchall() == [("credit", 1000, 1000), ("credit", 400, 1400), ("expiry", -100, 1300)] + [
        ("capture", -10, 1300 - 10 * n) for n in range(1, 13)
    ]
    events = _events(db, user)
    assert events.index(("grant.expired", None)) < events.index(("transaction.posted", "capture"))
    _audit(batching)
    assert value(scrape_until(batching.base_url, lambda s: value(s, _FALLBACKS) > fallbacks), _FALLBACKS) > fallbacks


_FALLBACKS = "billing_capture_batch_fallbacks_total"


def test_one_key_sent_by_a_capture_and_a_charge_at_once_is_used_once(batching, db):
    """Whichever posts first takes the key; the other is told it is reused. The batch reads its keys only after it
    holds the accounts' rows, which every ledger write locks, so no charge can spend a key between its look and
    its insert."""
    for _ in range(5):
        user, hold_id = _new_hold(batching, 500)
        requests: list[tuple[str, dict[str, Any], str | None]] = []
        for n in range(10):
            requests.append((f"/billing/holds/{hold_id}/capture", {"amount": 2}, f"k{n}"))
            requests.append(
                ("/billing/charge-tokens", {"user_id": str(user), "amount": 3, "description": "c"}, f"k{n}")
            )
        responses = asyncio.run(_post_all(batching, requests))
        for capture, charge in zip(responses[::2], responses[1::2], strict=True):
            # One of the two requests posted with the key; the other was told the key is taken by another body.
            assert sorted((capture.status_code, charge.status_code)) == [200, 422], (capture.text, charge.text)
        rows = db.execute(
            "SELECT idempotency_key, count(*) FROM transactions WHERE user_id = %s AND idempotency_key IS NOT NULL "
            "GROUP BY 1",
            (user,),
        ).fetchall()
        assert sorted(rows) == sorted((f"k{n}", 1) for n in range(10))
        balance, ledger_sum, _ = ledger_state(db, user)
        assert balance == ledger_sum
    _audit(batching)


def test_a_batch_that_fails_hands_every_capture_to_the_single_path(batching, db):
    """One capture the database refuses (a trigger, put in for this test, raises on its row) fails its whole batch;
    the batch then decides each capture alone, so only that one fails and its neighbours are posted."""
    user, hold_id = _new_hold(batching, 500)
    db.execute(
        """
        CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.description = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_poison BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION test_poison();
        """
    )
    try:
        fallbacks = _fallbacks(batching)
        bodies = [{"amount": 1, "description": "poison" if n == 10 else f"step {n}"} for n in range(20)]
        responses = _capture_all(batching, hold_id, bodies, [None] * 20)
    finally:
        db.execute("DROP TRIGGER test_poison ON transactions; DROP FUNCTION test_poison()")
    statuses = [response.status_code for response in responses]
    assert statuses == [200] * 10 + [500] + [200] * 9
    assert responses[10].json()["code"] == "internal_error"
    assert ledger_state(db, user) == (981, 981, 20)
    _audit(batching)
    # The poisoned batch's captures all went down the single path, not just the poisoned one.
    assert value(scrape_until(batching.base_url, lambda s: value(s, _FALLBACKS) > fallbacks + 1), _FALLBACKS) > (
        fallbacks + 1
    )
