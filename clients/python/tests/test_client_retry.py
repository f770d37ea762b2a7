"""Retries: the same Idempotency-Key on every attempt, so a retry can never charge twice; 4xx never retried."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from billing_client import (
    AsyncBillingClient,
    BillingClient,
    InsufficientBalance,
    RetryPolicy,
    ServiceUnavailable,
)

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, DroppingProxy, FaultyTransport, LiveServer, ledger_state


def _port(server: LiveServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def test_a_response_lost_after_the_charge_committed_is_retried_and_charges_once(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN) as direct:
        direct.credit(user_id, 100, "grant")
    proxy = DroppingProxy(_port(server), drop_first=1)
    try:
        with BillingClient(base_url=proxy.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            posted = billing.charge(user_id, 40, "run 1")
    finally:
        proxy.close()

    assert proxy.dropped == 1 and proxy.connections == 2
    assert posted.replayed  # the second attempt was answered from the first, committed one
    assert posted.balance == 60
    assert ledger_state(db, user_id) == (60, 60, 2)


def test_the_async_client_survives_a_lost_response_the_same_way(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    async def scenario(base_url: str) -> bool:
        async with AsyncBillingClient(base_url=base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as billing:
            posted = await billing.charge(user_id, 40, "run 1")
        return posted.replayed

    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN) as direct:
        direct.credit(user_id, 100, "grant")
    proxy = DroppingProxy(_port(server), drop_first=2)
    try:
        replayed = asyncio.run(scenario(proxy.base_url))
    finally:
        proxy.close()

    assert replayed and proxy.dropped == 2
    assert ledger_state(db, user_id) == (60, 60, 2)


def test_429_is_retried_after_retry_after_with_the_same_key(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    transport = FaultyTransport(failures=1, status=429, headers={"Retry-After": "1"})
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY, transport=transport) as billing:
        billing.credit(user_id, 50, "grant")  # attempt 1 is shed with 429, attempt 2 goes through
        billing.charge(user_id, 20, "run")

    credit_attempts = transport.requests[:2]
    assert [r.url.path for r in credit_attempts] == ["/billing/credit-tokens"] * 2
    assert credit_attempts[0].headers["Idempotency-Key"] == credit_attempts[1].headers["Idempotency-Key"]
    assert credit_attempts[0].headers["X-Request-ID"] == credit_attempts[1].headers["X-Request-ID"]
    # Retry-After (1 s) replaces FAST_RETRY's sub-second backoff.
    assert transport.sent_at[1] - transport.sent_at[0] >= 0.9
    assert transport.requests[2].headers["Idempotency-Key"] != credit_attempts[0].headers["Idempotency-Key"]
    assert ledger_state(db, user_id) == (30, 30, 2)


def test_503_is_retried_until_the_attempts_run_out(
    server: LiveServer, user_id: uuid.UUID, db: psycopg.Connection[Any]
) -> None:
    transport = FaultyTransport(failures=10, status=503)
    retry = RetryPolicy(attempts=3, timeout=10.0, wait_initial=0.01, wait_max=0.05, wait_jitter=0.01)
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=retry, transport=transport) as billing:
        with pytest.raises(ServiceUnavailable) as unavailable:
            billing.credit(user_id, 50, "grant")
    assert unavailable.value.status == 503
    assert len(transport.requests) == 3
    assert len({r.headers["Idempotency-Key"] for r in transport.requests}) == 1
    assert ledger_state(db, user_id) == (None, 0, 0)


def test_a_4xx_is_never_retried(server: LiveServer, user_id: uuid.UUID) -> None:
    transport = FaultyTransport(failures=0, status=200)
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY, transport=transport) as billing:
        billing.credit(user_id, 1, "grant")
        transport.requests.clear()
        with pytest.raises(InsufficientBalance):
            billing.charge(user_id, 2, "too much")
    assert len(transport.requests) == 1


def test_an_unreachable_service_raises_service_unavailable_after_retrying(user_id: uuid.UUID) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    retry = RetryPolicy(attempts=3, timeout=10.0, wait_initial=0.01, wait_max=0.05, wait_jitter=0.01)
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    started = time.monotonic()
    with BillingClient(base_url=f"http://127.0.0.1:{closed_port}", token="t", retry=retry, http_client=http) as billing:
        with pytest.raises(ServiceUnavailable) as unavailable:
            billing.balance(user_id)
    assert (unavailable.value.code, unavailable.value.status) == ("connection_error", None)
    assert len(sent) == 3
    assert time.monotonic() - started < 10
    http.close()
