"""Where the database comes from: the embedded PostgreSQL, the connection pool, and migrations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import create_engine, pool, text

from billing_service.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number works; every process that migrates takes the same lock, so only one runs DDL.
MIGRATION_LOCK_KEY = 0x62696C6C  # "bill"


class DatabaseNotReady(RuntimeError):
    """The database cannot be reached, or its schema is not at the code's revision."""


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the PostgreSQL from the pgserver wheel, with its data under `data_dir`.

    Returns a libpq URL. The server keeps running after this process exits (cleanup_mode="stop"), so
    workers, CLI commands and the next `billing serve` share one data directory, and data survives.
    """
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver then uses /tmp.
        warnings.simplefilter("ignore")
        import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(  # type: ignore[attr-defined]
        data_dir.resolve() / "pgdata", cleanup_mode="stop"
    )
    uri: str = server.get_uri()
    return uri


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url
    return start_embedded(settings.data_dir)


def _sqlalchemy_url(url: str) -> str:
    # Alembic speaks SQLAlchemy; point it at psycopg 3 with the same libpq URL.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", _sqlalchemy_url(url).replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the schema to head. Safe to run from many processes at once: an advisory lock serialises them."""
    config = _alembic_config(url)
    engine = create_engine(_sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                connection.commit()
    except Exception as exc:  # noqa: BLE001 - any failure here means the service cannot start
        raise DatabaseNotReady(f"could not migrate the database: {exc}") from exc
    finally:
        engine.dispose()


def pending_migrations(url: str) -> list[str]:
    """Revisions the code has and the database lacks; empty when the schema is current."""
    script = ScriptDirectory.from_config(_alembic_config(url))
    engine = create_engine(_sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except Exception as exc:  # noqa: BLE001
        raise DatabaseNotReady(f"cannot reach the database: {exc}") from exc
    finally:
        engine.dispose()
    if current == set(script.get_heads()):
        return []
    lower = next(iter(current)) if current else "base"
    newest_first = script.iterate_revisions("heads", lower)
    return [rev.revision for rev in reversed(list(newest_first)) if rev.revision not in current]


# psycopg_pool retries a failed connection with exponential backoff (1 s, 2 s, 4 s, ...): after a long outage
# its next attempt could come many seconds after the database is back. Giving up a retry chain after this
# long instead means the next request that finds the pool empty starts a fresh chain, whose first attempt is
# immediate: the pool reconnects within about a second of the database's return, however long it was away.
RECONNECT_CHAIN_SECONDS = 2.0
# While the database is known to be unreachable, a request waits this long for a connection, not the full
# pool timeout: callers get their 503 and Retry-After at once instead of piling up.
UNREACHABLE_WAIT_SECONDS = 0.25


class BillingPool(AsyncConnectionPool):
    """An AsyncConnectionPool that fails fast while the database is down and notices its return at once."""

    unreachable = False

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - psycopg_pool's signature
        if self.unreachable:
            timeout = min(timeout if timeout is not None else self.timeout, UNREACHABLE_WAIT_SECONDS)
        return await super().getconn(timeout)


def create_pool(url: str, settings: Settings, **kwargs: Any) -> AsyncConnectionPool:
    """The request path's pool: autocommit, so each ledger statement is its own transaction and one round trip."""
    options = f"-c statement_timeout={settings.statement_timeout_ms}"

    async def reachable(_: psycopg.AsyncConnection[Any]) -> None:
        billing_pool.unreachable = False

    def unreachable(_: AsyncConnectionPool) -> None:
        billing_pool.unreachable = True

    billing_pool = BillingPool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.pool_timeout,
        kwargs={"autocommit": True, "options": options, "connect_timeout": 3},
        open=False,
        name="billing",
        # A broken connection (database restarted) is noticed on return and replaced in the background.
        reconnect_timeout=RECONNECT_CHAIN_SECONDS,
        reconnect_failed=unreachable,
        configure=reachable,
        **kwargs,
    )
    return billing_pool


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)
