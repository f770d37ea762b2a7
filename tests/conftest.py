"""Shared fixtures: a real PostgreSQL and a real `billing serve` with several workers, reached over HTTP.

PostgreSQL is the embedded one (pgserver) unless TEST_DATABASE_URL names a server. Either way the suite
makes a fresh database of its own and drops it at the end. Tests isolate themselves by using fresh user
ids (uuid4): every table is keyed by user_id, so no test can see another's money.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
import psycopg
import pytest

SERVICE_TOKEN = "test-service-token-current"
NEXT_SERVICE_TOKEN = "test-service-token-next"
ROTATED_OUT_TOKEN = "test-service-token-rotated-out"
JWT_SECRET = "test-jwt-secret-" + "x" * 32


def with_database(url: str, name: str) -> str:
    """The same server URL, pointed at another database (works for TCP and socket URLs alike)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Postgres:
    """A PostgreSQL server the suite may create databases on."""

    admin_url: str
    pgdata: Path | None = None  # set when the suite owns the server (embedded), so it may stop and start it

    def create_database(self) -> str:
        name = f"billing_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield Postgres(admin_url=external)
        return
    import pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="billing-test-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield Postgres(admin_url=server.get_uri(), pgdata=pgdata)


@pytest.fixture(scope="session")
def database_url(postgres: Postgres) -> Iterator[str]:
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@dataclass
class LiveServer:
    """A running `billing serve` process and what a test needs to talk to it."""

    base_url: str
    database_url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = SERVICE_TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kwargs)

    def async_client(self, token: str | None = SERVICE_TOKEN, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=60, **kwargs)


def server_env(database_url: str, **overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BILLING_SERVICE_TOKENS": f"{SERVICE_TOKEN},{NEXT_SERVICE_TOKEN}",
        "BILLING_JWT_SECRET": JWT_SECRET,
        "BILLING_LOG_FORMAT": "json",
    }
    env.update(overrides)
    return env


def start_server(
    database_url: str, *, workers: int = 2, output: IO[bytes] | None = None, **env_overrides: str
) -> LiveServer:
    """Start `billing serve` as a user would, and wait until /readyz answers. `output` captures its logs."""
    port = free_port()
    env = server_env(database_url, **env_overrides)
    process = subprocess.Popen(
        [sys.executable, "-m", "billing_service", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        start_new_session=True,
        stdout=output,
        stderr=output,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"billing serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return LiveServer(base_url=base_url, database_url=database_url, process=process, env=env)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise RuntimeError("billing serve did not become ready in 60 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[LiveServer]:
    live = start_server(database_url, workers=2)
    yield live
    stop_server(live.process)


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Direct SQL access, to check that no money moved or to corrupt a row on purpose."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def user_id() -> uuid.UUID:
    return uuid.uuid4()


def user_jwt(user_id: uuid.UUID | str, *, expires_in: int = 600, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": str(user_id), "iat": now, "exp": now + expires_in, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def fund(client: httpx.Client, user_id: uuid.UUID, amount: int) -> None:
    response = client.post(
        "/billing/credit-tokens", json={"user_id": str(user_id), "amount": amount, "description": "test funding"}
    )
    assert response.status_code == 200, response.text


def ledger_state(db: psycopg.Connection[Any], user_id: uuid.UUID) -> tuple[int | None, int, int]:
    """(stored balance or None, ledger sum, transaction count) straight from the tables."""
    account = db.execute("SELECT balance FROM accounts WHERE user_id = %s", (user_id,)).fetchone()
    total, count = db.execute(
        "SELECT coalesce(sum(amount), 0), count(*) FROM transactions WHERE user_id = %s", (user_id,)
    ).fetchone() or (0, 0)
    return (account[0] if account else None), int(total), int(count)


def random_token() -> str:
    return secrets.token_urlsafe(24)


# Accounts written straight to the tables (a consistent ledger, fast) get what migration 0006 gives accounts
# that predate grants: one opening grant holding their balance, so draws and `billing audit` find their tokens.
OPENING_GRANTS_SQL = """
WITH opened AS (
    INSERT INTO grants (user_id, amount, priority, category, source)
    SELECT user_id, balance, 50, 'paid', 'opening' FROM accounts
    WHERE balance > 0 AND grants = '{}' AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.user_id = accounts.user_id)
    RETURNING user_id, id, priority, created_at
)
UPDATE accounts a
SET grants = ARRAY[ROW(o.id, a.balance - a.held, o.priority, NULL, o.created_at)::billing_grant_slot]
FROM opened o
WHERE a.user_id = o.user_id
"""


def give_opening_grants(conn: psycopg.Connection[Any]) -> None:
    conn.execute(OPENING_GRANTS_SQL)
