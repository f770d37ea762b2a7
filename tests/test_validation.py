"""Every class of bad input on every POST: a clear 4xx {detail, code}, and no money moves."""

from __future__ import annotations

import json

import pytest

from conftest import fund, ledger_state

WRITES = ["/billing/charge-tokens", "/billing/credit-tokens"]
MAX_BODY = 64 * 1024


def valid(user_id):
    return {"user_id": str(user_id), "amount": 5, "description": "run"}


# (name, change to a valid body) -> 422 validation_error.
BAD_FIELDS = [
    ("amount float", {"amount": 5.0}),
    ("amount fraction", {"amount": 1.5}),
    ("amount string", {"amount": "5"}),
    ("amount true", {"amount": True}),
    ("amount false", {"amount": False}),
    ("amount null", {"amount": None}),
    ("amount list", {"amount": [5]}),
    ("amount object", {"amount": {"value": 5}}),
    ("amount zero", {"amount": 0}),
    ("amount negative", {"amount": -1}),
    ("amount 2^53", {"amount": 2**53}),
    ("amount 2^64", {"amount": 2**64}),
    ("description empty", {"description": ""}),
    ("description 1001 chars", {"description": "x" * 1001}),
    ("description null", {"description": None}),
    ("description number", {"description": 5}),
    ("description NUL", {"description": "run\x00"}),
    ("user_id not a uuid", {"user_id": "not-a-uuid"}),
    ("user_id number", {"user_id": 12345}),
    ("user_id null", {"user_id": None}),
    ("user_id sql", {"user_id": "' OR 1=1 --"}),
    ("unknown field", {"currency": "EUR"}),
    ("metadata not an object", {"metadata": [1, 2]}),
    ("metadata NUL", {"metadata": {"note": "a\x00b"}}),
    ("metadata too big", {"metadata": {"blob": "x" * 5000}}),
]

MISSING = ["user_id", "amount", "description"]

# (name, raw body) -> 4xx, code among the expected ones.
RAW_BODIES = [
    ("garbage", b"{not json", {"invalid_json"}),
    ("truncated", b'{"user_id": "', {"invalid_json"}),
    ("empty", b"", {"invalid_json", "validation_error"}),
    ("array", b"[1, 2]", {"validation_error"}),
    ("string", b'"hello"', {"validation_error"}),
    ("number", b"42", {"validation_error"}),
    ("null", b"null", {"validation_error"}),
    ("not utf-8", b'{"description": "\xff\xfe"}', {"invalid_json"}),
    ("deeply nested", b"[" * 50_000, {"invalid_json"}),
]


def _assert_error(response, status, codes):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert body["code"] in codes
    assert body["detail"]


@pytest.fixture
def funded(client, user_id):
    fund(client, user_id, 100)
    return user_id


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize(("name", "change"), BAD_FIELDS, ids=[name for name, _ in BAD_FIELDS])
def test_a_bad_field_is_422_and_moves_no_money(client, db, funded, path, name, change):
    response = client.post(path, json={**valid(funded), **change})
    _assert_error(response, 422, {"validation_error"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize("field", MISSING)
def test_a_missing_field_is_422_and_moves_no_money(client, db, funded, path, field):
    body = valid(funded)
    del body[field]
    _assert_error(client.post(path, json=body), 422, {"validation_error"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize(("name", "raw", "codes"), RAW_BODIES, ids=[name for name, _, _ in RAW_BODIES])
def test_a_body_that_is_not_a_json_object_is_4xx_and_moves_no_money(client, db, funded, path, name, raw, codes):
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    _assert_error(response, response.status_code, codes)
    assert ledger_state(db, funded) == (100, 100, 1)


# Text Python's json module accepts but PostgreSQL's jsonb refuses: must be a 422, not a database error.
JSON_POSTGRES_REFUSES = [
    ("metadata NaN", '"metadata": {"ratio": NaN}'),
    ("metadata Infinity", '"metadata": {"ratio": -Infinity}'),
    ("metadata lone surrogate value", '"metadata": {"note": "\\ud800"}'),
    ("metadata lone surrogate key", '"metadata": {"\\udfff": 1}'),
    ("metadata escaped NUL", '"metadata": {"note": "\\u0000"}'),
    ("description lone surrogate", '"description": "\\ud800"'),
    ("description escaped NUL", '"description": "a\\u0000b"'),
]


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize(("name", "member"), JSON_POSTGRES_REFUSES, ids=[n for n, _ in JSON_POSTGRES_REFUSES])
def test_json_the_database_cannot_store_is_422_and_moves_no_money(client, db, funded, path, name, member):
    key = member.split(":")[0].strip('"')
    body = {k: v for k, v in valid(funded).items() if k != key}
    raw = json.dumps(body)[:-1] + ", " + member + "}"
    response = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    _assert_error(response, 422, {"validation_error"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
def test_an_integer_literal_too_long_to_parse_is_422_invalid_json(client, db, funded, path):
    raw = json.dumps(valid(funded)).replace('"amount": 5', '"amount": 1' + "0" * 5000)
    response = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    _assert_error(response, 422, {"invalid_json"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
def test_a_huge_body_is_413_and_moves_no_money(client, db, funded, path):
    body = {**valid(funded), "description": "x" * (MAX_BODY + 1)}
    _assert_error(client.post(path, json=body), 413, {"payload_too_large"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
def test_a_huge_chunked_body_without_content_length_is_413(client, db, funded, path):
    def chunks():
        yield json.dumps(valid(funded))[:-1].encode() + b', "pad": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    response = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    _assert_error(response, 413, {"payload_too_large"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_is_415(client, db, funded, path, content_type):
    raw = json.dumps(valid(funded)).encode()
    response = client.post(path, content=raw, headers={"Content-Type": content_type})
    _assert_error(response, 415, {"unsupported_media_type"})
    assert ledger_state(db, funded) == (100, 100, 1)


def test_json_with_a_charset_or_a_json_suffix_is_accepted(client, db, funded):
    raw = json.dumps(valid(funded)).encode()
    for content_type in ("application/json; charset=utf-8", "application/vnd.billing+json"):
        response = client.post("/billing/charge-tokens", content=raw, headers={"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text)
    assert ledger_state(db, funded) == (90, 90, 3)


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize("key", ["k" * 256, ""], ids=["256 chars", "empty"])
def test_a_bad_idempotency_key_is_422_and_moves_no_money(client, db, funded, path, key):
    response = client.post(path, json=valid(funded), headers={"Idempotency-Key": key})
    _assert_error(response, 422, {"validation_error", "invalid_idempotency_key"})
    assert ledger_state(db, funded) == (100, 100, 1)


@pytest.mark.parametrize(
    "body",
    [{"user_id": "nope"}, {"user_id": None}, {}, {"user_id": "6f1c1f0e-2b7a-4a53-9d2e-2b8f7f0c9a01", "x": 1}, [1]],
)
def test_bad_bodies_for_open_account_are_422(client, body):
    _assert_error(client.post("/billing/accounts", json=body), 422, {"validation_error"})


def test_garbage_for_open_account_is_422_and_huge_is_413(client):
    garbage = client.post("/billing/accounts", content=b"{", headers={"Content-Type": "application/json"})
    _assert_error(garbage, 422, {"invalid_json"})
    huge = client.post("/billing/accounts", json={"user_id": "x" * (MAX_BODY + 1)})
    _assert_error(huge, 413, {"payload_too_large"})
    text = client.post("/billing/accounts", content=b"user_id=1", headers={"Content-Type": "text/plain"})
    _assert_error(text, 415, {"unsupported_media_type"})


MALFORMED_IDS = [
    "not-a-uuid",
    "1234",
    "6f1c1f0e-2b7a-4a53-9d2e-2b8f7f0c9a0",  # one digit short
    "6f1c1f0e-2b7a-4a53-9d2e-2b8f7f0c9a01z",
    "' OR 1=1 --",
    "%00",
    "%ff%fe",
    "..%2f..%2fetc%2fpasswd",
    "x" * 5000,
    "🙂",
]


@pytest.mark.parametrize("endpoint", ["/billing/balance", "/billing/transactions"])
@pytest.mark.parametrize("bad_id", MALFORMED_IDS)
def test_a_malformed_user_id_in_a_path_is_404_or_422_never_500(client, endpoint, bad_id):
    response = client.get(f"{endpoint}/{bad_id}")
    assert response.status_code in (404, 422), response.text
    assert set(response.json()) == {"detail", "code"}


@pytest.mark.parametrize("path", ["/billing/balance/", "/billing/transactions/", "/billing/nothing-here"])
def test_an_unknown_path_is_404_with_the_error_shape(client, path):
    _assert_error(client.get(path), 404, {"not_found"})


def test_a_wrong_method_is_405_with_the_error_shape(client, user_id):
    _assert_error(client.get("/billing/charge-tokens"), 405, {"method_not_allowed"})
    _assert_error(client.delete(f"/billing/balance/{user_id}"), 405, {"method_not_allowed"})


@pytest.mark.parametrize("path", WRITES)
def test_a_body_without_a_content_type_moves_no_money_unless_it_is_valid_json(client, db, funded, path):
    raw = json.dumps(valid(funded)).encode()
    response = client.post(path, content=raw, headers={"Content-Type": ""})
    assert response.status_code in (200, 415, 422), response.text
    if response.status_code != 200:
        assert set(response.json()) == {"detail", "code"}
        assert ledger_state(db, funded) == (100, 100, 1)


def test_a_bad_idempotency_key_on_open_account_is_422_and_opens_nothing(client, db, user_id):
    response = client.post("/billing/accounts", json={"user_id": str(user_id)}, headers={"Idempotency-Key": "k" * 256})
    _assert_error(response, 422, {"validation_error", "invalid_idempotency_key"})
    assert ledger_state(db, user_id) == (None, 0, 0)
