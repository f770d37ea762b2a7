"""The outbox: an event exists iff its change committed; balance.low and balance.depleted fire exactly once."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from conftest import LiveServer, fund, start_server, stop_server, user_jwt
from events.conftest import EVENTS_ENV, feed, feed_until, wait_for


@pytest.fixture(scope="module", params=["single", "batched"])
def any_server(request: pytest.FixtureRequest, events_server: LiveServer, events_database: str) -> Iterator[LiveServer]:
    """The same proofs through the single-statement charge and through the batcher."""
    if request.param == "single":
        yield events_server
        return
    live = start_server(
        events_database,
        workers=2,
        BILLING_BATCH_CHARGES="true",
        BILLING_BATCH_MAX_SIZE="16",
        BILLING_DISPATCHER="false",
        **EVENTS_ENV,
    )
    yield live
    stop_server(live.process)


async def _charges(server: LiveServer, user: uuid.UUID, count: int, amount: int) -> list[httpx.Response]:
    async with server.async_client(limits=httpx.Limits(max_connections=100)) as client:
        body = {"user_id": str(user), "amount": amount, "description": "burst"}
        return await asyncio.gather(*(client.post("/billing/charge-tokens", json=body) for _ in range(count)))


def _types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


def test_every_committed_change_has_exactly_one_event_and_refusals_none(any_server, db):
    user = uuid.uuid4()
    with any_server.client() as client:
        fund(client, user, 30)
        responses = asyncio.run(_charges(any_server, user, 50, 1))
        assert Counter(r.status_code for r in responses) == {200: 30, 402: 20}
        events = feed_until(client, user, 32)
    posted = [event for event in events if event["type"] == "transaction.posted"]
    ledger = db.execute("SELECT id::text FROM transactions WHERE user_id = %s", (user,)).fetchall()
    assert sorted(event["data"]["id"] for event in posted) == sorted(row[0] for row in ledger)
    assert len(posted) == 31
    # The per-account order has no gaps, and the feed serves it in that order.
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert Counter(_types(events)) == {"transaction.posted": 31, "balance.depleted": 1}
    charged = {r.json()["transaction_id"]: r.json()["balance"] for r in responses if r.status_code == 200}
    for event in posted[1:]:
        assert event["data"]["balance_after"] == charged[event["data"]["id"]]
        assert event["data"]["amount"] == -1 and event["data"]["type"] == "debit"


def test_a_hundred_concurrent_charges_cross_the_threshold_once_and_a_credit_rearms(any_server):
    user = uuid.uuid4()
    with any_server.client() as client:
        opened = client.post("/billing/accounts", json={"user_id": str(user), "low_balance_threshold": 500})
        assert opened.status_code == 201, opened.text
        fund(client, user, 1000)
        assert {r.status_code for r in asyncio.run(_charges(any_server, user, 100, 9))} == {200}  # 1000 -> 100
        low = wait_for(lambda: [e for e in feed(client, user_id=str(user)) if e["type"] == "balance.low"], what="low")
        assert len(low) == 1
        assert low[0]["data"]["threshold"] == 500 and low[0]["data"]["available"] < 500
        # Further debits below the threshold do not fire again...
        assert {r.status_code for r in asyncio.run(_charges(any_server, user, 10, 1))} == {200}
        # ...a credit to the threshold or above re-arms, and the next crossing fires again.
        fund(client, user, 500)
        assert {r.status_code for r in asyncio.run(_charges(any_server, user, 20, 10))} == {200}
        events = feed_until(client, user, 133)
    assert Counter(_types(events))["balance.low"] == 2
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))


def test_balance_depleted_fires_once_until_the_next_credit(any_server):
    user = uuid.uuid4()
    with any_server.client() as client:
        fund(client, user, 5)
        assert {r.status_code for r in asyncio.run(_charges(any_server, user, 20, 10))} == {402}
        refused_hold = client.post("/billing/holds", json={"user_id": str(user), "amount": 10, "description": "x"})
        assert refused_hold.status_code == 402
        fund(client, user, 1)
        assert {r.status_code for r in asyncio.run(_charges(any_server, user, 5, 10))} == {402}
        events = feed_until(client, user, 4)
    assert _types(events) == ["transaction.posted", "balance.depleted", "transaction.posted", "balance.depleted"]
    assert events[1]["data"]["requested"] == 10 and events[1]["data"]["available"] == 5


def test_hold_events_and_an_unobserved_expiry(http):
    user = uuid.uuid4()
    fund(http, user, 100)
    hold = http.post("/billing/holds", json={"user_id": str(user), "amount": 40, "description": "run"}).json()
    http.post(f"/billing/holds/{hold['hold_id']}/capture", json={"amount": 10})
    http.post(f"/billing/holds/{hold['hold_id']}/capture", json={"amount": 5, "final": True})
    released = http.post("/billing/holds", json={"user_id": str(user), "amount": 20, "description": "r"}).json()
    assert http.post(f"/billing/holds/{released['hold_id']}/release").status_code == 200
    # Nobody touches this one again: the dispatcher's sweeper expires it.
    short = http.post("/billing/holds", json={"user_id": str(user), "amount": 30, "description": "s", "ttl_seconds": 1})
    assert short.status_code == 201, short.text
    events = wait_for(
        lambda: (e := feed(http, user_id=str(user))) and e[-1]["type"] == "hold.expired" and e, what="hold.expired"
    )
    assert _types(events) == [
        "transaction.posted",
        "hold.created",
        "transaction.posted",
        "transaction.posted",
        "hold.captured",
        "hold.created",
        "hold.released",
        "hold.created",
        "hold.expired",
    ]
    assert events[4]["data"]["status"] == "captured" and events[4]["data"]["captured"] == 15
    assert events[6]["data"]["released"] == 20
    assert events[8]["data"]["hold_id"] == short.json()["hold_id"]
    assert http.get(f"/billing/balance/{user}").json() == {
        "user_id": str(user),
        "balance": 85,
        "held": 0,
        "available": 85,
        "expiring": 0,
        "next_expiry": None,
    }


def test_the_feed_pages_with_link_filters_and_users_see_only_their_own(events_server, http):
    user, other = uuid.uuid4(), uuid.uuid4()
    for n in range(7):
        fund(http, user, n + 1)
    fund(http, other, 1)
    everything = feed_until(http, user, 7)
    # Paging by 3 gives the same events in the same order, each page's Link continuing after the last.
    pages, url, query = [], "/billing/events", {"limit": 3, "user_id": str(user)}
    while True:
        response = http.get(url, params=query)
        page = response.json()
        if not page:
            break
        pages.append(page)
        url, query = response.links["next"]["url"], None
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [e["id"] for page in pages for e in page] == [e["id"] for e in everything]
    assert [e["data"]["amount"] for e in everything] == [1, 2, 3, 4, 5, 6, 7]
    # The global feed is in (commit-safe) order too, and filters by type.
    assert all(e["type"] == "transaction.posted" for e in feed(http, type="transaction.posted", user_id=str(user)))
    assert feed(http, type="balance.low", user_id=str(user)) == []
    # A user JWT sees its own events, cannot ask for another's, and gets its own without asking.
    with events_server.client(token=user_jwt(user)) as mine:
        assert [e["id"] for e in feed(mine)] == [e["id"] for e in everything]
        assert [e["id"] for e in feed(mine, user_id=str(user))] == [e["id"] for e in everything]
        forbidden = mine.get("/billing/events", params={"user_id": str(other)})
        assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"
    bad = http.get("/billing/events", params={"after": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"
    assert http.get("/billing/events", params={"type": "nope"}).status_code == 422
