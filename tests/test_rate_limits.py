"""Rate limits on writes, per token and per account, held across two workers (through PostgreSQL), answered
with 429 + Retry-After before any database work; the SDK's retries get through.

Latencies are measured and printed, never asserted: the hard assertions are on counts and on the ledger.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from billing_client import BillingClient
from conftest import LiveServer, Postgres, ledger_state, random_token, start_server, stop_server

RATE = 5  # writes per second per token, and per account; burst the same
NAMES = ["ops", "flood", "calm", "sdk", *[f"u{i}" for i in range(8)]]
TOKENS = {name: random_token() for name in NAMES}


@pytest.fixture(scope="module")
def limited(postgres: Postgres) -> Iterator[LiveServer]:
    url = postgres.create_database()
    entries = ",".join(f"{name}:charge+credit+read:{token}" for name, token in TOKENS.items())
    live = start_server(
        url,
        workers=2,
        BILLING_SERVICE_TOKENS=entries,
        BILLING_RATE_LIMIT_TOKEN_RATE=str(RATE),
        BILLING_RATE_LIMIT_TOKEN_BURST=str(RATE),
        BILLING_RATE_LIMIT_USER_RATE=str(RATE),
        BILLING_RATE_LIMIT_USER_BURST=str(RATE),
        BILLING_ACCESS_LOG="false",
    )
    yield live
    stop_server(live.process)
    postgres.drop_database(url)


def fund(server: LiveServer, user_id: uuid.UUID, amount: int) -> None:
    """`ops` is limited like any token: wait out its 429s."""
    body = {"user_id": str(user_id), "amount": amount, "description": "funding"}
    with server.client(TOKENS["ops"]) as ops:
        for _ in range(20):
            response = ops.post("/billing/credit-tokens", json=body)
            if response.status_code != 429:
                assert response.status_code == 200, response.text
                return
            time.sleep(float(response.headers["Retry-After"]))
    raise AssertionError("funding never got through")


def charge_body(user_id: uuid.UUID) -> dict[str, object]:
    return {"user_id": str(user_id), "amount": 1, "description": "rate limit test"}


def p99(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(len(samples) * 0.99) - 1)] * 1000


def calm_charges(server: LiveServer, user_id: uuid.UUID, count: int, spacing: float) -> tuple[list[int], list[float]]:
    statuses, latencies = [], []
    with server.client(TOKENS["calm"]) as calm:
        for _ in range(count):
            started = time.perf_counter()
            statuses.append(calm.post("/billing/charge-tokens", json=charge_body(user_id)).status_code)
            latencies.append(time.perf_counter() - started)
            time.sleep(spacing)
    return statuses, latencies


async def flood(server: LiveServer, user_id: uuid.UUID, per_second: int, seconds: float) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=16)  # several connections: both workers see the flood
    async with server.async_client(TOKENS["flood"], limits=limits) as http:
        tasks = []
        for _ in range(int(per_second * seconds)):
            tasks.append(asyncio.create_task(http.post("/billing/charge-tokens", json=charge_body(user_id))))
            await asyncio.sleep(1 / per_second)
        return list(await asyncio.gather(*tasks))


def test_a_flooding_token_gets_429s_and_another_token_does_not(limited):
    flooder, calm_user = uuid.uuid4(), uuid.uuid4()
    fund(limited, flooder, 10_000)
    fund(limited, calm_user, 10_000)
    spacing = 1 / (RATE * 0.6)  # the calm token stays well under its limit
    unloaded_statuses, unloaded = calm_charges(limited, calm_user, 8, spacing)

    loaded: dict[str, list] = {}

    def calm_during_the_flood() -> None:
        loaded["statuses"], loaded["latencies"] = calm_charges(limited, calm_user, 10, spacing)

    calm_thread = threading.Thread(target=calm_during_the_flood)
    seconds = 3.0
    calm_thread.start()
    responses = asyncio.run(flood(limited, flooder, 20 * RATE, seconds))
    calm_thread.join()

    admitted = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code == 429]
    allowed = RATE * seconds + RATE  # the global bucket: rate x time + burst
    print(
        f"\nflood: {len(responses)} charges at {20 * RATE}/s for {seconds:g} s -> {len(admitted)} admitted "
        f"(a perfect global bucket: {allowed:g}), {len(refused)} refused with 429"
        f"\ncalm token p50/p99: unloaded {statistics.median(unloaded) * 1000:.1f}/{p99(unloaded):.1f} ms, "
        f"during the flood {statistics.median(loaded['latencies']) * 1000:.1f}/{p99(loaded['latencies']):.1f} ms"
    )
    assert len(admitted) + len(refused) == len(responses), {response.status_code for response in responses}
    assert len(refused) >= len(responses) // 2
    # Two workers, each with a share: within a small error of one global bucket, never one bucket per worker
    # (which would admit about 2 x allowed).
    assert len(admitted) <= 1.5 * allowed
    for response in refused:
        assert response.json()["code"] == "rate_limited"
        assert int(response.headers["Retry-After"]) >= 1
    assert set(unloaded_statuses) == {200} and set(loaded["statuses"]) == {200}
    # No money moved for any 429: one ledger row per admitted charge, plus the funding.
    with psycopg.connect(limited.database_url) as conn:
        assert ledger_state(conn, flooder) == (10_000 - len(admitted), 10_000 - len(admitted), 1 + len(admitted))


def test_many_tokens_on_one_account_hit_the_per_account_limit(limited):
    user = uuid.uuid4()
    fund(limited, user, 100)
    time.sleep(1.5)  # the account's bucket refills after its funding

    async def one_charge_per_token() -> list[httpx.Response]:
        async def charge(name: str) -> httpx.Response:
            async with limited.async_client(TOKENS[name]) as http:
                return await http.post("/billing/charge-tokens", json=charge_body(user))

        return list(await asyncio.gather(*(charge(f"u{i}") for i in range(8)), charge("u0"), charge("u1")))

    responses = asyncio.run(one_charge_per_token())
    refused = [response for response in responses if response.status_code == 429]
    admitted = [response for response in responses if response.status_code == 200]
    print(f"\none account, 10 charges from 8 tokens at once: {len(admitted)} admitted, {len(refused)} refused")
    assert refused and len(admitted) + len(refused) == len(responses)
    assert any("account" in response.json()["detail"] for response in refused)
    with psycopg.connect(limited.database_url) as conn:
        assert ledger_state(conn, user) == (100 - len(admitted), 100 - len(admitted), 1 + len(admitted))


def test_the_sdk_retries_through_429s(limited):
    user = uuid.uuid4()
    fund(limited, user, 1_000)
    seen: list[int] = []
    http = httpx.Client(event_hooks={"response": [lambda response: seen.append(response.status_code)]})
    with BillingClient(base_url=limited.base_url, token=TOKENS["sdk"], http_client=http) as sdk:
        posted = [sdk.charge(user, 1, f"sdk charge {i}") for i in range(15)]
    http.close()
    print(f"\nSDK: 15 charges, {seen.count(429)} answered 429 and retried after Retry-After")
    assert len({item.transaction_id for item in posted}) == 15
    assert seen.count(429) >= 1 and seen.count(200) == 15
    with psycopg.connect(limited.database_url) as conn:
        assert ledger_state(conn, user) == (985, 985, 16)  # retries never posted twice


# ---------------------------------------------------------------------------------------------------------
# The exchange's cost: quiet keys ride along every QUIET_EVERY syncs, idle keys are dropped (no database).


def test_a_quiet_key_is_exchanged_every_few_syncs_and_a_busy_one_every_sync() -> None:
    from billing_service.edge.limits import QUIET, KeyedBuckets

    buckets = KeyedBuckets(rate=1000, burst=2000)
    now = 100.0
    for _ in range(int(QUIET * 1000 * 0.2) + 5):  # over QUIET of the rate within one 0.2 s period
        buckets.take("busy", now, 0.5)
    buckets.take("quiet", now, 0.5)
    buckets.settle(0.2, now)
    assert buckets.busy(buckets.buckets["busy"])
    assert not buckets.busy(buckets.buckets["quiet"])

    # A sync that exchanged only the busy key reshares only it; the quiet key keeps its share.
    buckets.buckets["quiet"].share = 0.4
    buckets.reshare({"busy": 10_000.0, "quiet": 10_000.0}, live_workers=2, keys={"busy"})
    assert buckets.buckets["quiet"].share == 0.4
    assert buckets.buckets["busy"].share < 0.1
    # Busy elsewhere (as last read) makes it busy here too.
    buckets.reshare({"quiet": 10_000.0}, live_workers=2)
    assert buckets.busy(buckets.buckets["quiet"])


def test_an_idle_key_is_dropped_once_its_bucket_would_have_refilled() -> None:
    from billing_service.edge.limits import KeyedBuckets

    buckets = KeyedBuckets(rate=1000, burst=2000)  # an empty bucket refills in 2 s
    buckets.take("k", 100.0, 0.5)
    for step in range(1, 10):  # demand decays below 0.01 within the first 2 s
        buckets.settle(0.2, 100.0 + 0.2 * step)
    assert "k" in buckets.buckets
    for step in range(10, 12):
        buckets.settle(0.2, 100.0 + 0.2 * step)
    assert "k" not in buckets.buckets
