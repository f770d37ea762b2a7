"""User JWTs signed by an identity provider, verified with keys from its JWKS: a real local JWKS endpoint
serving keys generated here, and a real `billing serve` fetching them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from conftest import LiveServer, Postgres, fund, start_server, stop_server

ISSUER = "https://idp.test"
AUDIENCE = "billing"


class Jwks:
    """The identity provider's key endpoint: keys to publish, and whether it answers at all."""

    def __init__(self) -> None:
        self.published: dict[str, dict[str, Any]] = {}
        self.hang = False
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                jwks.fetches += 1
                if jwks.hang:
                    time.sleep(5)  # longer than the service's 2 s timeout
                    return
                body = json.dumps({"keys": list(jwks.published.values())}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, kid: str, key: Key) -> None:
        self.published[kid] = {**key.jwk, "kid": kid}


class Key:
    def __init__(self, kind: str) -> None:
        self.algorithm = "RS256" if kind == "rsa" else "EdDSA"
        if kind == "rsa":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, kid: str, user_id: uuid.UUID, *, expires_in: int = 600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": str(user_id), "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + expires_in, **claims}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def hmac_signed_with_public_key(key: Key, kid: str, user_id: uuid.UUID) -> str:
    """The classic confusion attack: HS256 'signed' with the RSA public key, which everybody has."""
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = _b64(json.dumps({"sub": str(user_id), "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}).encode())
    signature = hmac.new(key.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"rsa-1": Key("rsa"), "rsa-2": Key("rsa"), "ed-1": Key("ed25519"), "rsa-unpublished": Key("rsa")}


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Key]) -> Iterator[Jwks]:
    endpoint = Jwks()
    endpoint.publish("rsa-1", keys["rsa-1"])
    endpoint.publish("ed-1", keys["ed-1"])
    yield endpoint
    endpoint.server.shutdown()


@pytest.fixture(scope="module")
def idp_server(postgres: Postgres, jwks: Jwks) -> Iterator[LiveServer]:
    url = postgres.create_database()
    live = start_server(
        url, workers=2, BILLING_JWKS_URL=jwks.url, BILLING_JWT_ISSUER=ISSUER, BILLING_JWT_AUDIENCE=AUDIENCE
    )
    yield live
    stop_server(live.process)
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def owner(idp_server: LiveServer) -> uuid.UUID:
    owner = uuid.uuid4()
    with idp_server.client() as service:
        fund(service, owner, 42)
    return owner


def balance_as(server: LiveServer, token: str, user_id: uuid.UUID, *, times: int = 4) -> list[httpx.Response]:
    """Several requests, each on a new connection, so both workers answer (each has its own key cache)."""
    responses = []
    for _ in range(times):
        with server.client(token) as http:
            responses.append(http.get(f"/billing/balance/{user_id}"))
    return responses


def eventually(server: LiveServer, token: str, user_id: uuid.UUID, status: int) -> list[httpx.Response]:
    # A worker refetches the key set on an unknown kid at most once a second: a fresh kid right after another
    # miss may need a moment. No timing is asserted, only the outcome.
    deadline = time.monotonic() + 10
    while True:
        responses = balance_as(server, token, user_id)
        if all(response.status_code == status for response in responses) or time.monotonic() > deadline:
            return responses
        time.sleep(0.5)


def test_rs256_and_eddsa_tokens_read_their_own_account_and_nothing_more(idp_server, keys, owner):
    for kid in ("rsa-1", "ed-1"):
        token = keys[kid].token(kid, owner)
        assert [response.status_code for response in eventually(idp_server, token, owner, 200)] == [200] * 4
        with idp_server.client(token) as user:
            assert user.get(f"/billing/balance/{owner}").json()["balance"] == 42
            assert user.get(f"/billing/balance/{uuid.uuid4()}").status_code == 403
            charge = user.post("/billing/charge-tokens", json={"user_id": str(owner), "amount": 1, "description": "x"})
            assert (charge.status_code, charge.json()["code"]) == (403, "forbidden")


def test_rotation_old_and_new_keys_both_work_during_the_overlap(idp_server, jwks, keys, owner):
    old = keys["rsa-1"].token("rsa-1", owner)
    new = keys["rsa-2"].token("rsa-2", owner)
    assert {response.status_code for response in balance_as(idp_server, new, owner)} == {401}  # not published yet
    jwks.publish("rsa-2", keys["rsa-2"])  # the overlap: the IdP publishes both
    assert {response.status_code for response in eventually(idp_server, new, owner, 200)} == {200}
    assert {response.status_code for response in balance_as(idp_server, old, owner)} == {200}


@pytest.mark.parametrize(
    "case",
    ["wrong issuer", "wrong audience", "no issuer", "expired", "unknown kid", "hmac with the public key", "alg none"],
)
def test_bad_idp_tokens_are_refused(idp_server, keys, owner, case):
    rsa_key = keys["rsa-1"]
    token = {
        "wrong issuer": lambda: rsa_key.token("rsa-1", owner, iss="https://evil.test"),
        "wrong audience": lambda: rsa_key.token("rsa-1", owner, aud="someone-else"),
        "no issuer": lambda: jwt.encode(
            {"sub": str(owner), "aud": AUDIENCE, "exp": int(time.time()) + 600},
            rsa_key.private,
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
        "expired": lambda: rsa_key.token("rsa-1", owner, expires_in=-120),
        "unknown kid": lambda: keys["rsa-unpublished"].token("rsa-unpublished", owner),
        "hmac with the public key": lambda: hmac_signed_with_public_key(rsa_key, "rsa-1", owner),
        "alg none": lambda: (
            _b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
            + "."
            + _b64(json.dumps({"sub": str(owner), "iss": ISSUER, "aud": AUDIENCE, "exp": 2**40}).encode())
            + "."
        ),
    }[case]()
    for response in balance_as(idp_server, token, owner):
        assert response.status_code == 401, (case, response.text)
        assert response.json()["code"] == "invalid_token"


def test_a_jwks_that_hangs_fails_closed_quickly_and_cached_keys_still_answer(idp_server, jwks, keys, owner):
    cached = keys["ed-1"].token("ed-1", owner)
    assert {response.status_code for response in balance_as(idp_server, cached, owner, times=12)} == {200}
    jwks.hang = True
    try:
        # A kid no worker has cached needs a fetch, which times out: 503, never a hang and never accepted.
        fresh = keys["rsa-unpublished"].token("rsa-3", owner)
        jwks.publish("rsa-3", keys["rsa-unpublished"])  # published, but the endpoint does not answer
        seen = []
        deadline = time.monotonic() + 20
        while not any(response.status_code == 503 for response in seen) and time.monotonic() < deadline:
            started = time.monotonic()
            seen += balance_as(idp_server, fresh, owner, times=1)
            print(f"\nJWKS hanging: answered {seen[-1].status_code} in {time.monotonic() - started:.2f} s")
        # 401 only when a worker had refetched within the last second; never a 200, never a hang.
        assert {response.status_code for response in seen} <= {503, 401}
        unavailable = seen[-1]
        assert unavailable.status_code == 503, [response.text for response in seen]
        assert unavailable.json()["code"] == "auth_unavailable" and "Retry-After" in unavailable.headers
        # Keys already cached answer without I/O, and service tokens never depend on the IdP.
        assert {response.status_code for response in balance_as(idp_server, cached, owner)} == {200}
        with idp_server.client() as service:
            assert service.get(f"/billing/balance/{owner}").status_code == 200
    finally:
        jwks.hang = False
