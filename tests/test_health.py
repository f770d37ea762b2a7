"""/healthz says the process is alive; /readyz says the database answers, and 503 when it does not."""

from __future__ import annotations

import httpx
import pytest

from conftest import start_server, stop_server


def test_healthz(server):
    response = httpx.get(f"{server.base_url}/healthz", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_when_the_database_answers(server):
    response = httpx.get(f"{server.base_url}/readyz", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


@pytest.fixture
def server_whose_database_vanishes(postgres):
    url = postgres.create_database()
    live = start_server(url, workers=1)
    try:
        yield live, lambda: postgres.drop_database(url)
    finally:
        stop_server(live.process)
        postgres.drop_database(url)


def test_readyz_is_503_when_the_database_is_gone_and_healthz_stays_200(server_whose_database_vanishes):
    live, drop_database = server_whose_database_vanishes
    assert httpx.get(f"{live.base_url}/readyz", timeout=30).status_code == 200
    drop_database()  # terminates the pool's connections, and no new one can be made
    for _ in range(3):  # the broken pooled connections, then a fresh connection attempt
        response = httpx.get(f"{live.base_url}/readyz", timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "database_unavailable"
        assert response.headers["retry-after"]
    assert httpx.get(f"{live.base_url}/healthz", timeout=30).status_code == 200
