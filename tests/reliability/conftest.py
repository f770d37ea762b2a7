"""Reliability suites: each gets a database and a `billing serve` of its own, so its checks see only its money."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import LiveServer, Postgres, start_server, stop_server


@pytest.fixture(scope="module")
def own_database(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="module")
def own_server(own_database: str) -> Iterator[LiveServer]:
    live = start_server(own_database, workers=2)
    yield live
    stop_server(live.process)
