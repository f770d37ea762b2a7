"""/openapi.json documents every endpoint with its error responses; /docs serves the UI."""

from __future__ import annotations

import httpx
import pytest

# (method, path) -> the statuses its documentation must list, besides 200/201.
ENDPOINTS = {
    ("post", "/billing/charge-tokens"): {401, 402, 403, 409, 413, 415, 422, 503},
    ("post", "/billing/credit-tokens"): {401, 403, 409, 413, 415, 422, 503},
    ("post", "/billing/accounts"): {200, 401, 403, 413, 415, 422, 503},
    ("get", "/billing/balance/{user_id}"): {401, 403, 404, 422, 503},
    ("get", "/billing/transactions/{user_id}"): {401, 403, 404, 422, 503},
    ("post", "/billing/allowances"): {401, 403, 409, 413, 415, 422, 503},
    ("get", "/billing/allowances"): {401, 403, 422, 503},
    ("get", "/billing/allowances/{allowance_id}"): {401, 403, 404, 422, 503},
    ("delete", "/billing/allowances/{allowance_id}"): {401, 403, 404, 422, 503},
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {503},
}


@pytest.fixture(scope="module")
def openapi(server):
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


@pytest.mark.parametrize(("method", "path"), list(ENDPOINTS))
def test_every_endpoint_is_documented_with_its_error_responses(openapi, method, path):
    operation = openapi["paths"][path][method]
    documented = {int(status) for status in operation["responses"]}
    assert ENDPOINTS[(method, path)] <= documented, documented
    assert operation.get("summary") or operation.get("description")
    for status, response in operation["responses"].items():
        if int(status) >= 400 and path.startswith("/billing"):
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (status, schema)


def test_the_error_body_is_detail_and_code(openapi):
    error_body = openapi["components"]["schemas"]["ErrorBody"]
    assert set(error_body["properties"]) == {"detail", "code"}
    assert set(error_body["required"]) == {"detail", "code"}


@pytest.mark.parametrize(("method", "path"), [key for key in ENDPOINTS if key[1].startswith("/billing")])
def test_billing_endpoints_declare_bearer_auth(openapi, method, path):
    schemes = openapi["components"]["securitySchemes"]
    assert any(scheme.get("scheme") == "bearer" for scheme in schemes.values())
    assert openapi["paths"][path][method].get("security"), "no security requirement documented"


def test_writes_document_the_idempotency_key_header(openapi):
    for path in ("/billing/charge-tokens", "/billing/credit-tokens", "/billing/accounts", "/billing/allowances"):
        parameters = openapi["paths"][path]["post"]["parameters"]
        header = next(p for p in parameters if p["name"] == "Idempotency-Key")
        assert header["in"] == "header"


def test_history_documents_limit_cursor_and_the_link_header(openapi):
    operation = openapi["paths"]["/billing/transactions/{user_id}"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"user_id", "limit", "cursor"}
    assert "Link" in operation["responses"]["200"]["headers"]


def test_docs_serve_the_interactive_ui(server):
    response = httpx.get(f"{server.base_url}/docs", timeout=30)
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
