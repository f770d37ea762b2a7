"""GET /billing/transactions/{user_id}: signed history, newest first, streamed in full or walked in pages."""

from __future__ import annotations

import base64
import re
import threading
import time
from datetime import datetime

import pytest

from conftest import fund, give_opening_grants

FIELDS = {"id", "user_id", "amount", "description", "created_at", "type", "balance_after"}
LINK = re.compile(r'^<(?P<url>/billing/transactions/[^>]+)>; rel="next"$')


def charge(client, user_id, amount, description="use"):
    response = client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": amount, "description": description}
    )
    assert response.status_code == 200, response.text
    return response.json()


def history(client, user_id, **params):
    response = client.get(f"/billing/transactions/{user_id}", params=params)
    assert response.status_code == 200, response.text
    return response


def walk(client, user_id, limit, between_pages=None):
    """Follow the Link headers from the first page to the last; returns the items and the number of pages."""
    response = history(client, user_id, limit=limit)
    items, pages = list(response.json()), 1
    while "link" in response.headers:
        match = LINK.match(response.headers["link"])
        assert match, response.headers["link"]
        if between_pages:
            between_pages()
        response = client.get(match["url"])
        assert response.status_code == 200, response.text
        assert len(response.json()) <= limit
        items += response.json()
        pages += 1
    return items, pages


def test_history_is_signed_newest_first_and_sums_to_the_balance(client, user_id):
    fund(client, user_id, 100)
    charge(client, user_id, 30, "run 1")
    fund(client, user_id, 5)
    charge(client, user_id, 45, "run 2")
    response = history(client, user_id)
    assert response.headers["content-type"].startswith("application/json")
    items = response.json()
    assert [(i["type"], i["amount"], i["balance_after"], i["description"]) for i in items] == [
        ("debit", -45, 30, "run 2"),
        ("credit", 5, 75, "test funding"),
        ("debit", -30, 70, "run 1"),
        ("credit", 100, 100, "test funding"),
    ]
    for item in items:
        assert FIELDS <= set(item)
        assert item["user_id"] == str(user_id)
        datetime.fromisoformat(item["created_at"])
    balance = client.get(f"/billing/balance/{user_id}").json()["balance"]
    assert sum(item["amount"] for item in items) == balance == 30
    created = [datetime.fromisoformat(item["created_at"]) for item in items]
    assert created == sorted(created, reverse=True)


def test_history_ids_are_the_transaction_ids_the_writes_returned(client, user_id):
    fund(client, user_id, 10)
    posted = charge(client, user_id, 4)
    assert history(client, user_id).json()[0]["id"] == posted["transaction_id"]


def test_history_of_an_unknown_user_is_404_whole_or_paged(client, user_id):
    for params in ({}, {"limit": 10}):
        response = client.get(f"/billing/transactions/{user_id}", params=params)
        assert response.status_code == 404
        assert response.json()["code"] == "account_not_found"


def test_pages_walk_the_same_order_as_the_full_list(client, user_id):
    fund(client, user_id, 1000)
    for n in range(24):
        charge(client, user_id, 1, f"run {n}")
    full = history(client, user_id).json()
    assert len(full) == 25
    items, pages = walk(client, user_id, limit=10)
    assert pages == 3
    assert items == full
    first = history(client, user_id, limit=10)
    assert len(first.json()) == 10
    assert "limit=10" in first.headers["link"]


def test_the_last_page_has_no_link_even_when_it_is_full(client, user_id):
    fund(client, user_id, 100)
    for _ in range(9):
        charge(client, user_id, 1)
    items, pages = walk(client, user_id, limit=5)
    assert (len(items), pages) == (10, 2)
    exact = history(client, user_id, limit=10)
    assert len(exact.json()) == 10 and "link" not in exact.headers


def test_limit_bounds(client, user_id):
    fund(client, user_id, 10)
    charge(client, user_id, 1)
    assert len(history(client, user_id, limit=1).json()) == 1
    assert "link" in history(client, user_id, limit=1).headers
    assert len(history(client, user_id, limit=1000).json()) == 2
    for bad in (0, -1, 1001, "ten", 1.5, ""):
        response = client.get(f"/billing/transactions/{user_id}", params={"limit": bad})
        assert response.status_code == 422, bad
        assert response.json()["code"] == "validation_error"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "bm90LWEtY3Vyc29y",  # "not-a-cursor"
        _b64("v2:5"),
        _b64("v1:0"),
        _b64("v1:-3"),
        _b64("v1:abc"),
        _b64(f"v1:{2**63}"),
        _b64("v1:1:2"),
        "é",
        "%00",
    ],
)
def test_an_invalid_cursor_is_422_invalid_cursor(client, user_id, cursor):
    fund(client, user_id, 1)
    response = client.get(f"/billing/transactions/{user_id}", params={"limit": 5, "cursor": cursor})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_cursor"


def test_an_overlong_cursor_is_422(client, user_id):
    fund(client, user_id, 1)
    response = client.get(f"/billing/transactions/{user_id}", params={"limit": 5, "cursor": "A" * 5000})
    assert response.status_code == 422


def test_a_cursor_without_limit_still_pages(client, user_id):
    fund(client, user_id, 10)
    for _ in range(3):
        charge(client, user_id, 1)
    first = history(client, user_id, limit=2)
    cursor = LINK.match(first.headers["link"])["url"].split("cursor=")[1]
    rest = history(client, user_id, cursor=cursor).json()
    assert first.json() + rest == history(client, user_id).json()


def _assert_walk_is_a_gapless_suffix(walked, full):
    ids = [item["id"] for item in walked]
    assert len(ids) == len(set(ids)), "a page repeated a row"
    assert walked == full[len(full) - len(walked) :], "the walk skipped or reordered rows"


def test_pages_have_no_gaps_and_no_repeats_while_charges_arrive_between_them(client, user_id):
    fund(client, user_id, 10_000)
    for _ in range(19):
        charge(client, user_id, 1)
    walked, pages = walk(client, user_id, limit=3, between_pages=lambda: charge(client, user_id, 2, "meanwhile"))
    full = history(client, user_id).json()
    assert pages == 7
    assert len(walked) == 20 and len(full) == 26
    assert all(item["description"] != "meanwhile" for item in walked)
    _assert_walk_is_a_gapless_suffix(walked, full)


def test_pages_have_no_gaps_and_no_repeats_under_concurrent_charges(server, client, user_id):
    fund(client, user_id, 10_000)
    for _ in range(39):
        charge(client, user_id, 1)
    stop = threading.Event()
    arrived = []

    def keep_charging():
        with server.client() as writer:
            while not stop.is_set():
                arrived.append(charge(writer, user_id, 1, "concurrent"))

    writers = [threading.Thread(target=keep_charging) for _ in range(2)]
    for writer in writers:
        writer.start()

    def let_a_charge_land():
        # Pages and charges interleave for sure: each next page is read only after another charge committed.
        seen = len(arrived)
        deadline = time.monotonic() + 30
        while len(arrived) == seen and time.monotonic() < deadline:
            time.sleep(0.005)

    try:
        walked, _ = walk(client, user_id, limit=4, between_pages=let_a_charge_land)
        walked_twice, _ = walk(client, user_id, limit=7, between_pages=let_a_charge_land)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    full = history(client, user_id).json()
    assert len(arrived) >= 15, "charges did not arrive during the walks"
    assert len(walked) >= 40 and len(walked_twice) >= len(walked)
    _assert_walk_is_a_gapless_suffix(walked, full)
    _assert_walk_is_a_gapless_suffix(walked_twice, full)
    assert sum(item["amount"] for item in full) == client.get(f"/billing/balance/{user_id}").json()["balance"]


def test_the_full_history_streams_many_rows_intact(client, db, user_id):
    # More rows than one server-side fetch (ledger.HISTORY_STREAM_BATCH = 2000), written straight to the
    # tables (a consistent ledger) so the test stays fast.
    rows = 4500
    db.execute("INSERT INTO accounts (user_id, balance, last_seq) VALUES (%s, %s, %s)", (user_id, rows, rows))
    db.execute(
        "INSERT INTO transactions (user_id, seq, type, amount, balance_after, description)"
        " SELECT %s, n, 'credit', 1, n, 'bulk ' || n FROM generate_series(1, %s) AS n",
        (user_id, rows),
    )
    give_opening_grants(db)
    items = history(client, user_id).json()
    assert len(items) == rows
    assert [item["balance_after"] for item in items] == list(range(rows, 0, -1))
    assert len({item["id"] for item in items}) == rows
