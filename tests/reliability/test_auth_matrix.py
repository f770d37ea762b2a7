"""Auth matrix: every /billing endpoint (read from the live OpenAPI document, so a new endpoint is covered
the day it ships) against every kind of bad credential. Each gets the right 401 or 403, and nothing moves."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from conftest import JWT_SECRET, NEXT_SERVICE_TOKEN, ROTATED_OUT_TOKEN, SERVICE_TOKEN, LiveServer, fund, user_jwt

KNOWN_OPERATIONS = {
    ("POST", "/billing/charge-tokens"),
    ("POST", "/billing/credit-tokens"),
    ("POST", "/billing/accounts"),
    ("GET", "/billing/balance/{user_id}"),
    ("GET", "/billing/transactions/{user_id}"),
}


# Reads whose account is an optional `user_id` query parameter: the matrix names the owner's account there.
OPTIONAL_USER_QUERY = {"/billing/events"}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def alg_none_token(user_id: uuid.UUID) -> str:
    now = int(time.time())
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': str(user_id), 'iat': now, 'exp': now + 600})}."


def alg_none_with_secret_signature(user_id: uuid.UUID) -> str:
    """alg none in the header, but a valid HS256 signature: the header must not pick the algorithm."""
    good = user_jwt(user_id)
    _, payload, signature = good.split(".")
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.{signature}"


# (name, credential for (owner, other user), expected status on writes, expected status on a read of owner's account)
def credentials(owner: uuid.UUID, other: uuid.UUID) -> list[tuple[str, str | None, int, int]]:
    return [
        ("no token", None, 401, 401),
        ("bearer without a token", "Bearer", 401, 401),
        ("basic scheme", "Basic " + base64.b64encode(f"x:{SERVICE_TOKEN}".encode()).decode(), 401, 401),
        ("wrong service token", "Bearer not-a-token-we-issued", 401, 401),
        ("service token with a suffix", f"Bearer {SERVICE_TOKEN}x", 401, 401),
        ("rotated-out service token", f"Bearer {ROTATED_OUT_TOKEN}", 401, 401),
        ("user JWT on its own account", f"Bearer {user_jwt(owner)}", 403, 200),
        ("JWT for another user", f"Bearer {user_jwt(other)}", 403, 403),
        ("expired JWT", f"Bearer {user_jwt(owner, expires_in=-60)}", 401, 401),
        ("JWT without exp", f"Bearer {jwt.encode({'sub': str(owner)}, JWT_SECRET, algorithm='HS256')}", 401, 401),
        ("forged JWT", f"Bearer {user_jwt(owner, secret='not-the-secret-' + 'y' * 32)}", 401, 401),
        ("alg none", f"Bearer {alg_none_token(owner)}", 401, 401),
        ("alg none with a real signature", f"Bearer {alg_none_with_secret_signature(owner)}", 401, 401),
        ("JWT with a non-uuid sub", f"Bearer {user_jwt('../../etc/passwd')}", 401, 401),
    ]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    required_query: tuple[tuple[str, Any], ...]

    @property
    def reads_an_account(self) -> bool:
        """A GET naming the account it reads (in the path or the query), so a user JWT may read its own."""
        return self.method == "GET" and (
            "{user_id}" in self.path
            or any(name == "user_id" for name, _ in self.required_query)
            or self.path in OPTIONAL_USER_QUERY
        )


def _sample(name: str, schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    return 1 if schema.get("type") == "integer" else "x"


@pytest.fixture(scope="module")
def operations(own_server: LiveServer) -> list[Operation]:
    spec = httpx.get(f"{own_server.base_url}/openapi.json").json()
    found = [
        Operation(
            method.upper(),
            path,
            tuple(
                (parameter["name"], _sample(parameter["name"], parameter.get("schema", {})))
                for parameter in operation.get("parameters", [])
                if parameter["in"] == "query" and parameter.get("required")
            ),
        )
        for path, item in spec["paths"].items()
        if path.startswith("/billing")
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert KNOWN_OPERATIONS <= {(operation.method, operation.path) for operation in found}
    return found


@pytest.fixture(scope="module")
def owner(own_server: LiveServer) -> uuid.UUID:
    owner = uuid.uuid4()
    with own_server.client() as http:
        fund(http, owner, 1000)
    return owner


def ledger_snapshot(database_url: str) -> Iterator[Any]:
    with psycopg.connect(database_url) as conn:
        yield conn.execute("SELECT user_id, balance, last_seq FROM accounts ORDER BY user_id").fetchall()
        yield conn.execute("SELECT count(*), coalesce(sum(amount), 0) FROM transactions").fetchone()


def request_for(operation: Operation, owner: uuid.UUID) -> dict[str, Any]:
    # Path parameters other than user_id (say, a hold's id) get a fresh uuid: auth must fail before lookup.
    url = operation.path.replace("{user_id}", str(owner))
    while "{" in url:
        start, end = url.index("{"), url.index("}")
        url = url[:start] + str(uuid.uuid4()) + url[end + 1 :]
    params = {name: str(owner) if name == "user_id" else value for name, value in operation.required_query}
    if operation.path in OPTIONAL_USER_QUERY:
        params["user_id"] = str(owner)
    request: dict[str, Any] = {
        "method": operation.method,
        "url": url,
        "params": params,
        "headers": {"Idempotency-Key": str(uuid.uuid4())},
    }
    if operation.method != "GET":
        # A body that would succeed if authorisation were skipped: the owner is funded, the amount small.
        request["json"] = {"user_id": str(owner), "amount": 7, "description": "auth matrix"}
    return request


def test_service_tokens_old_and_new_both_work_during_rotation(own_server, owner):
    for token in (SERVICE_TOKEN, NEXT_SERVICE_TOKEN):
        with own_server.client(token) as http:
            assert http.get(f"/billing/balance/{owner}").status_code == 200


def test_every_endpoint_refuses_every_bad_credential_and_moves_nothing(own_server, own_database, operations, owner):
    other = uuid.uuid4()
    before = list(ledger_snapshot(own_database))
    failures = []
    tried = 0
    with httpx.Client(base_url=own_server.base_url, timeout=30) as http:
        for name, authorization, on_write, on_read in credentials(owner, other):
            for operation in operations:
                request = request_for(operation, owner)
                if authorization is not None:
                    request["headers"]["Authorization"] = authorization
                response = http.request(**request)
                tried += 1
                allowed = {on_read if operation.reads_an_account else on_write}
                if operation.method == "GET" and not operation.reads_an_account and on_write == 403:
                    allowed = {403, 404}  # a user asking for an object by an id nobody issued
                body = response.json()
                where = f"{name}: {operation.method} {operation.path}"
                if response.status_code not in allowed:
                    failures.append(f"{where} -> {response.status_code} {body}, expected {allowed}")
                elif response.status_code >= 400 and set(body) != {"detail", "code"}:
                    failures.append(f"{where} -> error body {body}")
                if response.status_code == 401 and response.headers.get("WWW-Authenticate") is None:
                    failures.append(f"{where} -> 401 without WWW-Authenticate")
    print(f"\nauth matrix: {tried} requests over {len(operations)} operations, {len(failures)} failures")
    assert not failures, "\n".join(failures)
    assert list(ledger_snapshot(own_database)) == before, "a refused request moved money or opened an account"
