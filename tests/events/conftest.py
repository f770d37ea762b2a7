"""Events tests: their own database and `billing serve` (webhook deliveries are global, so no other test's
events reach these receivers), with the dispatcher on, a compressed retry schedule and http://127.0.0.1
receivers allowed. Package-scoped: the server and its connections go when the package's tests are done, so the
rest of the suite's servers fit under PostgreSQL's connection limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from conftest import LiveServer, Postgres, start_server, stop_server
from events.receiver import Receiver

EVENTS_ENV = {
    "BILLING_WEBHOOKS_ALLOW_INSECURE": "true",
    "BILLING_WEBHOOK_RETRY_SCHEDULE": "0.2,0.5,1",
    "BILLING_WEBHOOK_TIMEOUT": "1",
    "BILLING_WEBHOOK_RETRY_AFTER_MAX": "3",
    "BILLING_HOLD_SWEEP_INTERVAL": "0.3",
    "BILLING_HOLD_SWEEP_DELAY": "0",
}


@pytest.fixture(scope="package")
def events_database(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="package")
def events_server(events_database: str) -> Iterator[LiveServer]:
    live = start_server(events_database, workers=2, **EVENTS_ENV)
    yield live
    stop_server(live.process)


@pytest.fixture
def http(events_server: LiveServer) -> Iterator[httpx.Client]:
    with events_server.client() as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    live = Receiver().start()
    yield live
    live.stop()


@pytest.fixture
def webhook(http: httpx.Client, receiver: Receiver) -> Iterator[dict[str, Any]]:
    response = http.post("/billing/webhooks", json={"url": receiver.url, "events": ["*"], "description": "test"})
    assert response.status_code == 201, response.text
    yield response.json()
    http.delete(f"/billing/webhooks/{response.json()['id']}")


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last(condition)}")


def last(condition: Callable[[], Any]) -> Any:
    value = condition()
    return value if not isinstance(value, list) else [(e.get("seq"), e.get("type")) for e in value][-10:]


def feed(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    """Every event the feed serves for these filters, following Link headers to the end."""
    events: list[dict[str, Any]] = []
    url: str | None = "/billing/events"
    query: dict[str, Any] | None = {"limit": 1000, **params}
    while url is not None:
        response = client.get(url, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        events += page
        url = response.links["next"]["url"] if page else None
        query = None
    return events


@pytest.fixture
def db(events_database: str) -> Iterator[psycopg.Connection[Any]]:
    """Direct SQL access to the events tests' database."""
    with psycopg.connect(events_database, autocommit=True) as conn:
        yield conn


def feed_until(client: httpx.Client, user_id: object, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The account's events once there are at least `count` (the feed lags commits only by running transactions)."""
    deadline = time.monotonic() + timeout
    while True:
        events = feed(client, user_id=str(user_id))
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} events, wanted {count}: {[(e['seq'], e['type']) for e in events]}")
        time.sleep(0.05)
