"""Grants test helpers: credits with terms, and the grant audit narrowed to the accounts a test owns."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from billing_service.grants import rules as grants_rules


def at(seconds: float) -> str:
    """An RFC 3339 time `seconds` from now (UTC, with an offset)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def grant(client: httpx.Client, user_id: uuid.UUID, amount: int, **terms: Any) -> str:
    """A credit with grant terms; returns its grant id."""
    body = {"user_id": str(user_id), "amount": amount, "description": terms.pop("description", "grant"), **terms}
    response = client.post("/billing/credit-tokens", json=body)
    assert response.status_code == 200, response.text
    grant_id: str = response.json()["grant_id"]
    return grant_id


def charge(client: httpx.Client, user_id: uuid.UUID, amount: int) -> httpx.Response:
    return client.post(
        "/billing/charge-tokens", json={"user_id": str(user_id), "amount": amount, "description": "agent step"}
    )


def funding_of(row: dict[str, Any]) -> list[tuple[str, int]]:
    return [(entry["grant_id"], entry["amount"]) for entry in row["funding"] or []]


def history(client: httpx.Client, user_id: uuid.UUID) -> list[dict[str, Any]]:
    """Oldest first."""
    response = client.get(f"/billing/transactions/{user_id}")
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows[::-1]


def remaining(client: httpx.Client, user_id: uuid.UUID) -> dict[str, int]:
    response = client.get(f"/billing/grants/{user_id}")
    assert response.status_code == 200, response.text
    return {item["grant_id"]: item["remaining"] for item in response.json()}


def grant_problems(db: psycopg.Connection[Any], *user_ids: uuid.UUID) -> list[tuple[Any, ...]]:
    """`billing audit`'s grant checks, for these accounts only (other tests corrupt theirs on purpose)."""
    return [problem for problem in grants_rules.audit(db) if problem[0] in user_ids]


def wait_until(moment: str) -> None:
    delay = (datetime.fromisoformat(moment) - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay + 0.05)
