"""Named, scoped service tokens (env and database) and the caller trail, through a real `billing serve`.

A token without a route's scope gets 403 insufficient_scope and moves nothing; every ledger row says which
token posted it and under which request id; `billing tokens` manages database tokens, which only store a
hash and stop working once revoked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from conftest import LiveServer, Postgres, fund, ledger_state, random_token, start_server, stop_server, user_jwt
from test_cli import assert_clear_error, billing

TOKENS = {name: random_token() for name in ("ops", "charger", "reader", "crediter")}
SCOPES = {"ops": "charge+credit+read+admin", "charger": "charge", "reader": "read", "crediter": "credit"}


@pytest.fixture(scope="module")
def scoped_db(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def scoped(scoped_db: str) -> Iterator[LiveServer]:
    entries = ",".join(f"{name}:{SCOPES[name]}:{token}" for name, token in TOKENS.items())
    live = start_server(scoped_db, workers=2, BILLING_SERVICE_TOKENS=entries)
    yield live
    stop_server(live.process)


def as_(server: LiveServer, name: str) -> httpx.Client:
    return server.client(TOKENS[name])


def _body(user_id: uuid.UUID, amount: int = 3) -> dict[str, Any]:
    return {"user_id": str(user_id), "amount": amount, "description": "scope test"}


def test_a_charge_token_may_charge_and_hold_but_not_credit_open_or_mint(scoped, scoped_db):
    user = uuid.uuid4()
    with as_(scoped, "ops") as ops:
        fund(ops, user, 100)
    with as_(scoped, "charger") as charger:
        assert charger.post("/billing/charge-tokens", json=_body(user)).status_code == 200
        hold = charger.post("/billing/holds", json={**_body(user), "ttl_seconds": 60})
        assert hold.status_code == 201, hold.text
        with psycopg.connect(scoped_db) as conn:
            before = ledger_state(conn, user)
        refused = [
            charger.post("/billing/credit-tokens", json=_body(user)),
            charger.post("/billing/accounts", json={"user_id": str(uuid.uuid4())}),
            charger.post("/billing/tokens", json={"name": "sneaky", "scopes": ["admin"]}),
            charger.get("/billing/tokens"),
            charger.get(f"/billing/balance/{user}"),  # charge alone does not read
            charger.post("/billing/webhooks", json={"url": "http://127.0.0.1:1/"}),  # not built yet: admin
        ]
    for response in refused:
        assert response.status_code == 403, (response.request.url, response.text)
        assert response.json()["code"] == "insufficient_scope"
        assert "charger" in response.json()["detail"] and TOKENS["charger"] not in response.text
    with psycopg.connect(scoped_db) as conn:
        assert ledger_state(conn, user) == before
        assert conn.execute("SELECT count(*) FROM service_tokens").fetchone() == (0,)


def test_a_read_token_cannot_charge_and_a_credit_token_cannot_charge_or_read(scoped, scoped_db):
    user = uuid.uuid4()
    with as_(scoped, "crediter") as crediter:
        assert crediter.post("/billing/credit-tokens", json=_body(user, 50)).status_code == 200
        assert crediter.post("/billing/charge-tokens", json=_body(user)).json()["code"] == "insufficient_scope"
        assert crediter.get(f"/billing/transactions/{user}").status_code == 403
    with as_(scoped, "reader") as reader:
        assert reader.get(f"/billing/balance/{user}").json()["balance"] == 50
        assert reader.get(f"/billing/usage/{user}", params={"group_by": "day"}).status_code == 200
        for path in ("/billing/charge-tokens", "/billing/holds"):
            response = reader.post(path, json={**_body(user), "ttl_seconds": 60})
            assert (response.status_code, response.json()["code"]) == (403, "insufficient_scope"), path
    with psycopg.connect(scoped_db) as conn:
        assert ledger_state(conn, user) == (50, 50, 1)


def test_every_posted_row_names_its_token_and_request(scoped):
    user = uuid.uuid4()
    with as_(scoped, "crediter") as crediter:
        crediter.post("/billing/credit-tokens", json=_body(user, 100), headers={"X-Request-ID": "req-credit-1"})
    with as_(scoped, "charger") as charger:
        # The batcher (the default) and the single-statement fallback after it both carry the caller.
        charged = charger.post("/billing/charge-tokens", json=_body(user), headers={"X-Request-ID": "req-charge-1"})
        assert charged.status_code == 200
        hold = charger.post("/billing/holds", json={**_body(user, 10), "ttl_seconds": 60}).json()
        captured = charger.post(
            f"/billing/holds/{hold['hold_id']}/capture", json={"amount": 4}, headers={"X-Request-ID": "req-capture-1"}
        )
        assert captured.status_code == 200, captured.text
    with as_(scoped, "reader") as reader:
        history = reader.get(f"/billing/transactions/{user}").json()
    trail = [(row["type"], row["posted_by"], row["request_id"]) for row in history]
    assert trail == [
        ("capture", "charger", "req-capture-1"),
        ("debit", "charger", "req-charge-1"),
        ("credit", "crediter", "req-credit-1"),
    ]
    assert not any(token in str(history) for token in TOKENS.values())


def test_a_user_jwt_is_not_a_service_even_with_read(scoped, scoped_db):
    # Users hold only `read`, and only of their own account: a write stays 403 forbidden, not a scope matter.
    user = uuid.uuid4()
    with scoped.client(user_jwt(user)) as reader:
        assert reader.post("/billing/charge-tokens", json=_body(user)).json()["code"] == "forbidden"
        assert reader.get("/billing/tokens").json()["code"] == "forbidden"


def _wait_for(server: LiveServer, token: str, expected: int, path: str) -> httpx.Response:
    """New and revoked database tokens reach every worker within about a second."""
    deadline = time.monotonic() + 10
    # A fresh connection per request reaches whichever worker accepts it.
    with server.client(token) as http:
        http.headers["Connection"] = "close"
        while True:
            responses = [http.get(path) for _ in range(4)]
            if all(response.status_code == expected for response in responses) or time.monotonic() > deadline:
                # One worker has the change; every worker reloads its tokens each second.
                time.sleep(1.5)
                return responses[-1]
            time.sleep(0.3)


def test_cli_token_commands_create_list_and_revoke(scoped, scoped_db):
    user = uuid.uuid4()
    with as_(scoped, "ops") as ops:
        fund(ops, user, 20)
    created = billing(scoped_db, "tokens", "create", "orchestrator", "--scopes", "charge+read")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("bst_")
    with psycopg.connect(scoped_db) as conn:
        stored = conn.execute("SELECT name, scopes, token_hash FROM service_tokens").fetchall()
    assert [(name, scopes) for name, scopes, _ in stored] == [("orchestrator", ["charge", "read"])]
    assert secret.encode() not in bytes(stored[0][2])

    assert _wait_for(scoped, secret, 200, f"/billing/balance/{user}").status_code == 200
    with scoped.client(secret) as bot:
        assert bot.post("/billing/charge-tokens", json=_body(user)).status_code == 200
        assert bot.post("/billing/credit-tokens", json=_body(user)).json()["code"] == "insufficient_scope"
        assert bot.get(f"/billing/transactions/{user}").json()[0]["posted_by"] == "orchestrator"

    # Names are unique across database and env tokens; scopes are checked; nothing is half-made.
    # (A clash with an env token's name is the same check: see the HTTP test below.)
    assert_clear_error(billing(scoped_db, "tokens", "create", "orchestrator", "--scopes", "read"), "token_name_taken")
    assert_clear_error(billing(scoped_db, "tokens", "create", "other", "--scopes", "charge+root"), "unknown scope")

    listed = billing(scoped_db, "tokens", "list")
    assert listed.returncode == 0 and "orchestrator\tcharge+read" in listed.stdout
    assert secret not in listed.stdout and secret[4:16] not in listed.stdout

    revoked = billing(scoped_db, "tokens", "revoke", "orchestrator")
    assert revoked.returncode == 0, revoked.stderr
    refused = _wait_for(scoped, secret, 401, f"/billing/balance/{user}")
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_token"


def test_admin_tokens_mint_over_http_and_names_collide_with_409(scoped):
    with as_(scoped, "ops") as ops:
        made = ops.post("/billing/tokens", json={"name": "reporting", "scopes": ["read"]})
        assert made.status_code == 201, made.text
        assert made.json()["token"].startswith("bst_") and made.json()["scopes"] == ["read"]
        assert ops.post("/billing/tokens", json={"name": "reporting", "scopes": ["read"]}).status_code == 409
        clash = ops.post("/billing/tokens", json={"name": "charger", "scopes": ["read"]})
        assert (clash.status_code, clash.json()["code"]) == (409, "token_name_taken")
        bad = ops.post("/billing/tokens", json={"name": "x", "scopes": ["superuser"]})
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid_scope")
        listed = ops.get("/billing/tokens").json()
        assert "reporting" in [token["name"] for token in listed]
        assert "token" not in listed[0] and made.json()["token"] not in str(listed)


def test_serve_refuses_bad_token_configuration_clearly(scoped_db, tmp_path):
    secret = random_token()
    with psycopg.connect(scoped_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_tokens (id, name, scopes, token_hash) VALUES ('000000000000', 'in-db', '{read}', '')"
        )
    for entries, needle in [
        (f"a:charge+root:{secret},b:read:{random_token()},b:charge:{random_token()}", "unknown scope"),
        (f"in-db:read:{secret}", "in the database"),
    ]:
        result = billing(scoped_db, "serve", "--port", "1", cwd=tmp_path, BILLING_SERVICE_TOKENS=entries)
        assert_clear_error(result, needle)
        assert secret not in result.stderr + result.stdout


def test_audit_warns_about_rows_without_a_caller_but_passes(scoped, scoped_db):
    user = uuid.uuid4()
    with as_(scoped, "ops") as ops:
        fund(ops, user, 5)
    with psycopg.connect(scoped_db, autocommit=True) as conn:
        conn.execute("UPDATE transactions SET posted_by = NULL WHERE user_id = %s", (user,))  # a pre-0004 row
    result = billing(scoped_db, "audit")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: 1 ledger rows have no recorded caller" in result.stdout
