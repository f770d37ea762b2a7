"""Auth fails closed: service tokens for everything, a user JWT only to read its own account."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import jwt
import pytest

from conftest import (
    JWT_SECRET,
    NEXT_SERVICE_TOKEN,
    ROTATED_OUT_TOKEN,
    SERVICE_TOKEN,
    fund,
    ledger_state,
    user_jwt,
)


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _alg_none_token(user_id) -> str:
    now = int(time.time())
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': str(user_id), 'exp': now + 600})}."


def _reads(user_id):
    return [
        f"/billing/balance/{user_id}",
        f"/billing/transactions/{user_id}",
        f"/billing/transactions/{user_id}?limit=5",
    ]


def _writes(user_id):
    body = {"user_id": str(user_id), "amount": 1, "description": "auth test"}
    return [
        ("/billing/credit-tokens", body),
        ("/billing/charge-tokens", body),
        ("/billing/accounts", {"user_id": str(user_id)}),
    ]


def _bad_credentials(user_id):
    now = int(time.time())
    return {
        "missing": {},
        "bearer without a token": {"Authorization": "Bearer"},
        "basic scheme": {"Authorization": f"Basic {base64.b64encode(b'user:' + SERVICE_TOKEN.encode()).decode()}"},
        "token without scheme": {"Authorization": SERVICE_TOKEN},
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "rotated-out token": {"Authorization": f"Bearer {ROTATED_OUT_TOKEN}"},
        "token prefix": {"Authorization": f"Bearer {SERVICE_TOKEN[:-1]}"},
        "token plus suffix": {"Authorization": f"Bearer {SERVICE_TOKEN}x"},
        "expired jwt": {"Authorization": f"Bearer {user_jwt(user_id, expires_in=-60)}"},
        "forged jwt": {"Authorization": f"Bearer {user_jwt(user_id, secret='not-the-secret-' + 'y' * 32)}"},
        "alg none jwt": {"Authorization": f"Bearer {_alg_none_token(user_id)}"},
        "hs512 jwt": {
            "Authorization": "Bearer "
            + jwt.encode({"sub": str(user_id), "exp": now + 600}, JWT_SECRET, algorithm="HS512")
        },
        "jwt without exp": {"Authorization": "Bearer " + jwt.encode({"sub": str(user_id)}, JWT_SECRET)},
        "jwt without sub": {"Authorization": "Bearer " + jwt.encode({"exp": now + 600}, JWT_SECRET)},
        "jwt with a non-uuid sub": {"Authorization": f"Bearer {user_jwt('alice')}"},
        "tampered jwt": {"Authorization": f"Bearer {user_jwt(user_id)[:-2]}xx"},
    }


BAD = list(_bad_credentials(uuid.uuid4()))


@pytest.fixture
def anonymous(server):
    with server.client(token=None) as http:
        yield http


@pytest.mark.parametrize("case", BAD)
def test_bad_credentials_are_401_on_reads(anonymous, client, user_id, case):
    fund(client, user_id, 10)
    headers = _bad_credentials(user_id)[case]
    for path in _reads(user_id):
        response = anonymous.get(path, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["code"] in {"unauthorized", "invalid_token"}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("case", BAD)
def test_bad_credentials_are_401_on_writes_and_move_nothing(anonymous, db, client, user_id, case):
    fund(client, user_id, 10)
    headers = _bad_credentials(user_id)[case]
    for path, body in _writes(user_id):
        response = anonymous.post(path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert set(response.json()) == {"detail", "code"}
    assert ledger_state(db, user_id) == (10, 10, 1)


def test_authentication_comes_before_body_checks(anonymous):
    garbage = anonymous.post("/billing/charge-tokens", content=b"{", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 401
    huge = anonymous.post("/billing/charge-tokens", content=b"x" * 100_000, headers={"Content-Type": "text/plain"})
    assert huge.status_code == 401
    assert anonymous.get("/billing/balance/not-a-uuid").status_code == 401
    assert anonymous.get("/billing/no-such-route").status_code == 401


@pytest.mark.parametrize("token", [SERVICE_TOKEN, NEXT_SERVICE_TOKEN])
def test_both_rotation_tokens_may_read_and_write(server, db, user_id, token):
    with server.client(token=token) as http:
        for path, body in _writes(user_id):
            assert http.post(path, json=body).status_code in (200, 201), path
        for path in _reads(user_id):
            assert http.get(path).status_code == 200, path
    assert ledger_state(db, user_id) == (0, 0, 2)


def test_the_scheme_name_is_case_insensitive(anonymous, client, user_id):
    fund(client, user_id, 1)
    response = anonymous.get(f"/billing/balance/{user_id}", headers={"Authorization": f"bearer {SERVICE_TOKEN}"})
    assert response.status_code == 200


def test_a_user_jwt_reads_its_own_balance_and_history(server, client, user_id):
    fund(client, user_id, 9)
    with server.client(token=user_jwt(user_id)) as user:
        balance = user.get(f"/billing/balance/{user_id}").json()
        assert (balance["user_id"], balance["balance"]) == (str(user_id), 9)
        history = user.get(f"/billing/transactions/{user_id}")
        assert history.status_code == 200 and len(history.json()) == 1
        assert user.get(f"/billing/transactions/{user_id}", params={"limit": 1}).status_code == 200


def test_a_user_jwt_reading_its_own_unknown_account_gets_404(server, user_id):
    with server.client(token=user_jwt(user_id)) as user:
        assert user.get(f"/billing/balance/{user_id}").status_code == 404


def test_a_user_jwt_may_not_read_another_users_account(server, client, user_id):
    other = uuid.uuid4()
    fund(client, other, 5)
    with server.client(token=user_jwt(user_id)) as user:
        for path in _reads(other):
            response = user.get(path)
            assert response.status_code == 403, path
            assert response.json()["code"] == "forbidden"
    # Refused for an account that does not exist too, so a 403/404 difference reveals nothing.
    with server.client(token=user_jwt(user_id)) as user:
        assert user.get(f"/billing/balance/{uuid.uuid4()}").status_code == 403


def test_a_user_jwt_may_not_write_even_to_its_own_account(server, db, client, user_id):
    fund(client, user_id, 10)
    with server.client(token=user_jwt(user_id)) as user:
        for path, body in _writes(user_id):
            response = user.post(path, json=body)
            assert response.status_code == 403, path
            assert response.json()["code"] == "forbidden"
    assert ledger_state(db, user_id) == (10, 10, 1)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/openapi.json"])
def test_health_and_docs_need_no_auth(server, path):
    assert httpx.get(server.base_url + path, timeout=30).status_code == 200
