"""DATABASE_URL: libpq's multi-host forms are accepted as they are; malformed ones stop `billing` with one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from billing_service import db


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h1:5432,h2:5433/billing?target_session_attrs=read-write",
        "postgresql://u@h1,h2/billing?target_session_attrs=primary",
        "host=h1,h2 port=5432,5433 dbname=billing user=u target_session_attrs=read-write",
        "host=h1,h2 port=5432 dbname=billing",
        "postgresql://u@localhost/billing",
    ],
)
def test_multi_host_urls_are_accepted(url: str) -> None:
    assert db.check_database_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u@h1:5432,h2:5433,h3:1/billing?target_session_attrs=bogus", "target_session_attrs"),
        ("host=h1,h2,h3 port=5432,5433 dbname=billing", "3 host(s) but 2 port values"),
        ("postgresql://u@h1:5432,h2:notaport/billing", "invalid port"),
        ("host=h1,,h2 dbname=billing", "empty host"),
        ("host='unterminated dbname=billing", "not a valid libpq connection string"),
    ],
)
def test_malformed_urls_are_refused_clearly(url: str, says: str) -> None:
    with pytest.raises(db.DatabaseNotReady, match="DATABASE_URL") as refused:
        db.check_database_url(url)
    assert says in str(refused.value)


def test_billing_stops_with_one_line_for_a_malformed_url() -> None:
    env = {**os.environ, "DATABASE_URL": "host=h1,h2,h3 port=1,2 dbname=billing", "BILLING_SERVICE_TOKENS": "t"}
    for command in (["serve"], ["migrate"], ["audit"]):
        done = subprocess.run(
            [sys.executable, "-m", "billing_service", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [
            "error: DATABASE_URL lists 3 host(s) but 2 port values: give one port for all hosts or one per host,"
            " in the same order"
        ], done.stderr
