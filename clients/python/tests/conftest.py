"""The SDK is tested against the real service: these are the main suite's fixtures (a real `billing serve`
with several workers on real PostgreSQL), registered for this directory too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from billing_client import BillingClient

from .sdk_support import FAST_RETRY, SERVICE_TOKEN, LiveServer, suite

postgres = suite.postgres
database_url = suite.database_url
server = suite.server
db = suite.db
user_id = suite.user_id


@pytest.fixture
def billing(server: LiveServer) -> Iterator[BillingClient]:
    with BillingClient(base_url=server.base_url, token=SERVICE_TOKEN, retry=FAST_RETRY) as client:
        yield client
