"""The reads the console added to the domains' APIs: spend per day and model, the balance series, accounts by
prefix or recent activity, and an account's recent events. Same authorisation as the other reads."""

from __future__ import annotations

import uuid

import httpx

from conftest import LiveServer, fund, user_jwt


def _charge(client: httpx.Client, user: uuid.UUID, amount: int, **metadata: object) -> None:
    response = client.post(
        "/billing/charge-tokens",
        json={"user_id": str(user), "amount": amount, "description": "run", "metadata": metadata},
    )
    assert response.status_code == 200, response.text


def test_usage_by_day_and_model(client: httpx.Client, user_id: uuid.UUID) -> None:
    fund(client, user_id, 1000)
    _charge(client, user_id, 10, model="a", run_id="r1", input_tokens=5)
    _charge(client, user_id, 20, model="b", run_id="r1")
    _charge(client, user_id, 30, model="a", run_id="r2", input_tokens=7)
    _charge(client, user_id, 5, run_id="r3")
    body = client.get(f"/billing/usage/{user_id}", params={"group_by": "day,model"}).json()
    assert body["group_by"] == "day,model"
    by_model = {g["group"]["model"]: g for g in body["groups"]}
    assert {m: g["tokens"] for m, g in by_model.items()} == {"a": 40, "b": 20, None: 5}
    assert by_model["a"]["input_tokens"] == 12 and by_model["a"]["transactions"] == 2
    assert len({g["group"]["day"] for g in body["groups"]}) == 1


def test_balance_series(client: httpx.Client, user_id: uuid.UUID) -> None:
    fund(client, user_id, 100)
    _charge(client, user_id, 30)
    _charge(client, user_id, 20)
    points = client.get(f"/billing/balance/{user_id}/series").json()["points"]
    assert [p["balance"] for p in points] == [100, 70, 50]
    assert [p["at"] for p in points] == sorted(p["at"] for p in points)
    newest = client.get(f"/billing/balance/{user_id}/series", params={"limit": 2}).json()["points"]
    assert [p["balance"] for p in newest] == [70, 50]
    assert client.get(f"/billing/balance/{uuid.uuid4()}/series").status_code == 404


def test_accounts_by_prefix_and_recent(client: httpx.Client, server: LiveServer, user_id: uuid.UUID) -> None:
    fund(client, user_id, 77)
    found = client.get("/billing/accounts", params={"user_id_prefix": str(user_id)[:8]}).json()
    assert str(user_id) in [a["user_id"] for a in found]
    exact = client.get("/billing/accounts", params={"user_id_prefix": str(user_id)}).json()
    assert exact == [{**exact[0], "user_id": str(user_id), "balance": 77, "held": 0, "available": 77}]
    assert client.get("/billing/accounts").json()[0]["user_id"] == str(user_id)  # the most recently active
    assert client.get("/billing/accounts", params={"user_id_prefix": "xyz"}).status_code == 422
    with server.client(user_jwt(user_id)) as user:
        assert user.get("/billing/accounts").status_code == 403


def test_recent_events(client: httpx.Client, server: LiveServer, user_id: uuid.UUID) -> None:
    fund(client, user_id, 100)
    _charge(client, user_id, 1)
    events = client.get(f"/billing/events/recent/{user_id}", params={"limit": 1}).json()
    assert [(e["type"], e["data"]["amount"]) for e in events] == [("transaction.posted", -1)]
    with server.client(user_jwt(user_id)) as user:
        assert len(user.get(f"/billing/events/recent/{user_id}").json()) == 2
        assert user.get(f"/billing/events/recent/{uuid.uuid4()}").status_code == 403


def test_session_cookies_are_signed_with_a_key_every_worker_derives_alike() -> None:
    import time

    from billing_service.console import sessions
    from billing_service.settings import Settings

    one = Settings(service_tokens="a,b", jwt_secret="s" * 32)  # type: ignore[arg-type]
    same = Settings(service_tokens="b,a", jwt_secret="s" * 32)  # type: ignore[arg-type]
    rotated = Settings(service_tokens="a,c", jwt_secret="s" * 32)  # type: ignore[arg-type]
    key = sessions.signing_key(one)
    assert key == sessions.signing_key(same) != sessions.signing_key(rotated)
    later = int(time.time()) + 600
    cookie = sessions.cookie_value(key, "sid", later)
    assert sessions.parse_cookie(key, cookie) == "sid"
    assert sessions.parse_cookie(sessions.signing_key(rotated), cookie) is None
    assert sessions.parse_cookie(key, cookie.replace(str(later), str(later + 1))) is None  # expiry tampered
    assert sessions.parse_cookie(key, sessions.cookie_value(key, "sid", int(time.time()) - 1)) is None  # expired
    assert sessions.csrf_ok(key, "sid", sessions.csrf_token(key, "sid"))
    assert not sessions.csrf_ok(key, "other", sessions.csrf_token(key, "sid"))
    assert not sessions.csrf_ok(key, "sid", None)
