"""/metrics: Prometheus text summed over every worker of a real `billing serve`, with no per-request DB work."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from conftest import SERVICE_TOKEN, LiveServer, fund, start_server, stop_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[LiveServer]:
    """A server of this module's own: the assertions are exact deltas of process-wide counters, which a request
    still in flight from another module's test (a killed client, say) would otherwise disturb."""
    live = start_server(database_url, workers=2)
    yield live
    stop_server(live.process)


def scrape(base_url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # A new connection per scrape, so successive scrapes land on different workers.
    response = httpx.get(f"{base_url}/metrics", headers={**headers, "Connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape_until(
    base_url: str, done: Callable[[Samples], bool], timeout: float = 10, token: str | None = None
) -> Samples:
    deadline = time.monotonic() + timeout
    samples = scrape(base_url, token)
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(base_url, token)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def fresh_connection_client(server: LiveServer) -> httpx.Client:
    # Connection: close on every request spreads the requests over the workers.
    return httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}", "Connection": "close"},
        timeout=30,
    )


def test_charges_and_tokens_are_counted_by_result_across_workers(server: LiveServer) -> None:
    funded, empty, unknown = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    before = scrape(server.base_url)
    with fresh_connection_client(server) as http:
        fund(http, funded, 1000)
        fund(http, empty, 5)
        for n in range(6):
            assert http.post(
                "/billing/charge-tokens", json={"user_id": str(funded), "amount": 10, "description": f"run {n}"}
            ).is_success
        for key in ("k1", "k1", "k1"):  # one charge, two replays
            assert http.post(
                "/billing/charge-tokens",
                json={"user_id": str(funded), "amount": 7, "description": "keyed"},
                headers={"Idempotency-Key": key},
            ).is_success
        for _ in range(2):
            refused = http.post("/billing/charge-tokens", json={"user_id": str(empty), "amount": 6, "description": "x"})
            assert refused.status_code == 402
        missing = http.post("/billing/charge-tokens", json={"user_id": str(unknown), "amount": 1, "description": "x"})
        assert missing.json()["code"] == "account_not_found"

    # Each worker flushes its tallies every second; once both have, every scrape, whichever worker answers it,
    # sees every worker's counts, exactly.
    scrape_until(
        server.base_url,
        lambda s: value(s, "billing_tokens_credited_total") - value(before, "billing_tokens_credited_total") >= 1005,
    )
    time.sleep(1.2)
    for _ in range(6):
        after = scrape(server.base_url)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)  # noqa: B023

        assert delta("billing_charges_total", result="success") == 7
        assert delta("billing_charges_total", result="replayed") == 2
        assert delta("billing_charges_total", result="insufficient_balance") == 2
        assert delta("billing_charges_total", result="account_not_found") == 1
        assert delta("billing_tokens_debited_total") == 6 * 10 + 7
        assert delta("billing_tokens_credited_total") == 1005


def test_http_requests_are_labelled_by_route_template_and_status(server: LiveServer) -> None:
    user = uuid.uuid4()
    before = scrape(server.base_url)
    with fresh_connection_client(server) as http:
        assert http.get(f"/billing/balance/{user}").status_code == 404
        assert http.get(f"/billing/balance/{uuid.uuid4()}").status_code == 404
    assert httpx.get(f"{server.base_url}/billing/balance/{user}").status_code == 401  # refused before routing
    route = {"method": "GET", "route": "/billing/balance/{user_id}"}

    expected = (("404", 2), ("401", 1))

    def all_counted(samples: Samples) -> bool:
        return all(
            value(samples, "billing_http_requests_total", **route, status=status)
            - value(before, "billing_http_requests_total", **route, status=status)
            >= count
            for status, count in expected
        )

    # A request is counted once its last byte is sent, and each worker flushes its tally every second:
    # the counts are exact once both have flushed.
    after = scrape_until(server.base_url, all_counted)
    for status, count in expected:
        labels = {**route, "status": status}
        assert (
            value(after, "billing_http_requests_total", **labels)
            - value(before, "billing_http_requests_total", **labels)
            == count
        )
        assert (
            value(after, "billing_http_request_duration_seconds_count", **labels)
            - value(before, "billing_http_request_duration_seconds_count", **labels)
            == count
        )
    # Raw paths never become labels: one series per route, not one per user.
    assert not any(str(user) in dict(labels).get("route", "") for _, labels in after)


def test_pool_gauges_sum_over_the_live_workers(server: LiveServer) -> None:
    # Two workers, each with a pool of at most 16 (the default): 32 once both have sampled their pool.
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(server.base_url)
        if value(samples, "billing_db_pool_max") == 32 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert value(samples, "billing_db_pool_max") == 32
    assert value(samples, "billing_db_pool_size") >= 2
    assert 0 <= value(samples, "billing_db_pool_in_use") <= 32
    assert value(samples, "billing_db_pool_waiting") >= 0
    assert ("billing_active_holds", frozenset()) in samples
    assert ("billing_held_tokens", frozenset()) in samples


def test_holds_are_gauged_at_scrape_time_and_captures_count_as_debits(server: LiveServer) -> None:
    user = uuid.uuid4()
    with fresh_connection_client(server) as http:
        fund(http, user, 1000)
        before = scrape(server.base_url)
        hold = http.post("/billing/holds", json={"user_id": str(user), "amount": 300, "description": "run"})
        assert hold.status_code == 201, hold.text
        hold_id = hold.json()["hold_id"]
        held = scrape(server.base_url)
        for _ in range(2):  # the second is a replay: no more tokens leave the balance
            captured = http.post(
                f"/billing/holds/{hold_id}/capture", json={"amount": 40}, headers={"Idempotency-Key": f"cap-{hold_id}"}
            )
            assert captured.status_code == 200, captured.text
        released = http.post(f"/billing/holds/{hold_id}/release")
        assert released.status_code == 200, released.text
    debited = value(before, "billing_tokens_debited_total") + 40
    after = scrape_until(server.base_url, lambda s: value(s, "billing_tokens_debited_total") >= debited)
    time.sleep(1.2)  # a replay counted by mistake would reach the scrape within a flush
    after = scrape(server.base_url)

    assert value(held, "billing_active_holds") - value(before, "billing_active_holds") == 1
    assert value(held, "billing_held_tokens") - value(before, "billing_held_tokens") == 300
    assert value(after, "billing_active_holds") == value(before, "billing_active_holds")
    assert value(after, "billing_tokens_debited_total") - value(before, "billing_tokens_debited_total") == 40


def test_a_fresh_serve_ignores_stale_samples_honours_the_metrics_token_and_exports_batch_sizes(
    database_url: str, tmp_path: Path
) -> None:
    # A counter file left by an earlier run in the configured directory must not leak into this run.
    stale = MmapedDict(str(tmp_path / "counter_999999.db"))
    key = mmap_key("billing_charges_total", "billing_charges_total", ["result"], ["success"], "stale")
    stale.write_value(key, 1_000_000.0, 0.0)
    stale.close()

    live = start_server(
        database_url,
        workers=1,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
        BILLING_METRICS_TOKEN="metrics-secret-1",
        BILLING_BATCH_CHARGES="true",
    )
    try:
        refused = httpx.get(f"{live.base_url}/metrics")
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        assert (
            httpx.get(f"{live.base_url}/metrics", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}).status_code
            == 401
        )
        samples = scrape(live.base_url, token="metrics-secret-1")
        assert value(samples, "billing_charges_total", result="success") < 1_000_000

        user = uuid.uuid4()
        with live.client() as http:
            fund(http, user, 100)

        async def charge_together() -> None:
            async with live.async_client() as http:
                body = {"user_id": str(user), "amount": 1, "description": "batched"}
                answers = await asyncio.gather(*(http.post("/billing/charge-tokens", json=body) for _ in range(20)))
            assert all(answer.status_code == 200 for answer in answers)

        asyncio.run(charge_together())
        # The batcher's totals are sampled once a second.
        samples = scrape_until(
            live.base_url, lambda s: value(s, "billing_batch_size_sum") >= 20, token="metrics-secret-1"
        )
        assert value(samples, "billing_batch_size_sum") == 20
        assert 1 <= value(samples, "billing_batch_size_count") <= 20
    finally:
        stop_server(live.process)
