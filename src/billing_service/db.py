"""Where the database comes from: the embedded PostgreSQL, the connection pool, and migrations."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any, cast

import msgspec
import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import _queries as psycopg_queries
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import create_engine, pool, text

from billing_service.errors import CommitNotReplicated
from billing_service.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number works; every process that migrates takes the same lock, so only one runs DDL.
MIGRATION_LOCK_KEY = 0x62696C6C  # "bill"


def configure_psycopg() -> None:
    """Two process-wide psycopg settings, measured on the hot path (docs/performance.md, round four).

    - Cache the conversion of every statement of ours, however long. psycopg turns a statement's %(name)s
      placeholders into $n with a regex pass and caches the result only for statements up to 4 KB
      (MAX_CACHED_STATEMENT_LENGTH: it spares memory on the ever-new SQL that ORMs generate). Ours are a fixed
      set of constants, and HOLD_CAPTURE (9.7 KB) paid 85 µs of parsing in the worker at every capture.
      tests/test_db_pool.py checks that a long statement hits the cache, so an upgrade of psycopg that moves
      this constant fails a test instead of slowing captures down unseen.
    - jsonb in and out through msgspec instead of the json module: a few µs per metadata object each way.
      Request metadata is validated before it gets here (ledger/schemas.py: no NaN, no lone surrogates), the
      two cases where msgspec and json would differ.
    """
    psycopg_queries.MAX_CACHED_STATEMENT_LENGTH = 64 * 1024
    set_json_dumps(msgspec.json.encode)
    set_json_loads(msgspec.json.decode)


configure_psycopg()


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


_TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")


def check_database_url(url: str) -> str:
    """Refuse, with a message an operator can act on, a DATABASE_URL libpq would refuse or misread.

    Accepts both libpq forms: `postgresql://u@h1:p1,h2:p2/db?target_session_attrs=read-write` and
    `host=h1,h2 port=p1,p2 dbname=db target_session_attrs=read-write`. Returns the URL unchanged.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparseable"
        raise DatabaseNotReady(f"DATABASE_URL is not a valid libpq connection string: {message}") from exc
    hosts = str(params.get("host") or "").split(",")
    for name in ("port", "hostaddr"):
        values = str(params.get(name) or "").split(",")
        if params.get(name) and len(values) not in (1, len(hosts)):
            raise DatabaseNotReady(
                f"DATABASE_URL lists {len(hosts)} host(s) but {len(values)} {name} values: give one {name} for "
                f"all hosts or one per host, in the same order"
            )
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise DatabaseNotReady(f"DATABASE_URL has an invalid port {port!r}")
    if len(hosts) > 1 and any(not host for host in hosts):
        raise DatabaseNotReady("DATABASE_URL lists an empty host between commas")
    attrs = params.get("target_session_attrs")
    if attrs is not None and attrs not in _TARGET_SESSION_ATTRS:
        raise DatabaseNotReady(
            f"DATABASE_URL has target_session_attrs={attrs!r}; use one of {', '.join(_TARGET_SESSION_ATTRS)}"
        )
    if len(hosts) > 1 and attrs in (None, "any"):
        log.warning(
            "DATABASE_URL lists %d hosts without target_session_attrs=read-write: after a failover the pool may "
            "connect to a read-only standby",
            len(hosts),
        )
    return url


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return check_database_url(settings.database_url)
    return start_embedded(settings.data_dir)


def _engine(url: str) -> Any:
    # Alembic speaks SQLAlchemy. SQLAlchemy's own URL parser cannot read libpq's multi-host URLs or the
    # keyword form, so psycopg (that is, libpq) parses the URL and SQLAlchemy only gets the connection.
    return create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(url, connect_timeout=5), poolclass=pool.NullPool
    )


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate(url: str) -> None:
    """Bring the schema to head. Safe to run from many processes at once: an advisory lock serialises them."""
    config = _alembic_config()
    engine = _engine(url)
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
    script = ScriptDirectory.from_config(_alembic_config())
    engine = _engine(url)
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


# The warning PostgreSQL sends, instead of an error, when a commit's wait for the synchronous standby is cancelled
# (a cancel request, pg_cancel_backend, pg_terminate_backend, a client that went away): the transaction "has
# already committed locally, but might not have been replicated to the standby". The statement then succeeds.
_SYNC_REPLICATION_SIGNS = ("synchronous replication", "committed locally")


def _is_unreplicated_commit(diag: psycopg.errors.Diagnostic) -> bool:
    text = f"{diag.message_primary or ''} {diag.message_detail or ''}"
    return diag.severity_nonlocalized == "WARNING" and any(sign in text for sign in _SYNC_REPLICATION_SIGNS)


class BillingConnection(psycopg.AsyncConnection[Any]):
    """A pool connection that remembers a commit PostgreSQL could not replicate, and bounds every round trip.

    `unreplicated` is set by a notice handler (installed by the pool's `configure`) when the server warns that
    a commit's wait for the synchronous standby was cancelled. `round_trip_limit`: PostgreSQL's
    statement_timeout does not cover that wait (it is disarmed before the commit), so with the standby gone a
    commit would hang forever. After this many seconds the round trip is cancelled (a cancel request, then the
    answer drained): a commit waiting for the standby then ends with the warning, and raises
    CommitNotReplicated; anything else raises QueryCanceled (a 503 database_unavailable).

    The bound is psycopg's own wait deadline, not an `asyncio.timeout` around the wait: psycopg already arms a
    timer for every wait on the socket and checks the deadline when it wakes, so the bound costs a clock read
    per round trip instead of a timer and a context manager (~5% of a balance read's CPU).
    """

    unreplicated: bool = False
    round_trip_limit: float | None = None

    async def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        limit = self.round_trip_limit
        if limit is None or (timeout is not None and timeout <= limit):
            # No bound, or the caller's own is tighter (and its _WaitTimeout is the caller's to handle).
            return await super().wait(gen, interval, timeout)
        try:
            return await super().wait(gen, interval, limit)
        except psycopg.errors._WaitTimeout as exc:
            # What psycopg does when a wait is cancelled: ask the server to cancel, then read the answer, so the
            # connection is left idle (and a commit's "not replicated" warning reaches the notice handler).
            try:
                await self.cancel_safe(timeout=5.0)
            except Exception as cancel_failed:  # noqa: BLE001 - the drain below still bounds the wait
                log.warning("could not cancel a statement past its bound: %s", cancel_failed)
            try:
                await super().wait(gen, interval, 5.0)
            except psycopg.errors._WaitTimeout:
                log.warning("statement not ended after its cancel: closing the connection")
                self.pgconn.finish()
            except psycopg.Error:
                pass  # QueryCanceled, as asked
            if self.unreplicated:
                raise CommitNotReplicated() from exc
            raise psycopg.errors.QueryCanceled(
                f"no answer from PostgreSQL within {limit:.1f} s; the statement was cancelled"
            ) from exc


def _watch_replication(conn: BillingConnection) -> None:
    ref = weakref.ref(conn)

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if _is_unreplicated_commit(diag) and (watched := ref()) is not None:
            watched.unreplicated = True
            log.error(
                "a commit was not confirmed by the synchronous standby: %s %s",
                diag.message_primary,
                diag.message_detail or "",
            )

    conn.add_notice_handler(on_notice)


# The replication barrier: a transactional WAL record, so its commit waits for the synchronous standby like any
# write. It commits after everything already committed on this server, so once it returns without the warning,
# every earlier commit has reached the standby. Needs no privilege and touches no table.
REPLICATION_BARRIER = "SELECT pg_logical_emit_message(true, 'billing_service', 'replication barrier')"


async def confirm_replicated(conn: psycopg.AsyncConnection[Any]) -> None:
    """Before acknowledging a write this request did not make (an idempotent replay): make sure it is on the
    synchronous standby. An earlier attempt may have committed it only locally (and got commit_not_replicated);
    a replay must not turn that into a 200. Raises CommitNotReplicated (at the pool) if the barrier is not."""
    await conn.execute(REPLICATION_BARRIER)


class BillingPool(AsyncConnectionPool):
    """An AsyncConnectionPool that fails fast while the database is down and notices its return at once,
    and never lets a request acknowledge a commit the synchronous standby did not confirm."""

    unreachable = False

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - psycopg_pool's signature
        if self.unreachable:
            timeout = min(timeout if timeout is not None else self.timeout, UNREACHABLE_WAIT_SECONDS)
        return await super().getconn(timeout)

    def connection(self, timeout: float | None = None) -> _Checkout:  # type: ignore[override]  # noqa: ASYNC109
        """Every user of the pool (ledger, holds, batcher, CLI) gets its connection through here. When the block
        ends and the connection saw a commit the standby did not confirm, the connection is discarded and
        CommitNotReplicated raised, whatever the block returned: the request answers 503, never 2xx. The routes
        build their responses after their `async with pool.connection()` blocks, so this runs first."""
        return _Checkout(self, timeout)


class _Checkout:
    """`async with pool.connection() as conn`: psycopg_pool's own block (commit on success, roll back on an
    error, then return the connection), plus the replication check; one plain object instead of two nested
    generator-based context managers, and no commit call when autocommit left nothing to commit."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: BillingPool, timeout: float | None) -> None:  # noqa: ASYNC109
        self._pool = pool
        self._timeout = timeout
        self._conn: BillingConnection | None = None

    async def __aenter__(self) -> BillingConnection:
        conn = self._conn = cast(BillingConnection, await self._pool.getconn(self._timeout))
        conn.unreplicated = False
        return conn

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        conn = self._conn
        assert conn is not None
        self._conn = None
        try:
            if not conn.closed and conn.pgconn.transaction_status != TransactionStatus.IDLE:
                # A block that left a transaction open: what psycopg's `async with conn` does (the commit may
                # be the one that waits for the standby, so it runs before the check below).
                if exc_type is None:
                    await conn.commit()
                else:
                    try:
                        await conn.rollback()
                    except Exception as rollback_failed:  # noqa: BLE001 - the block's own error goes on
                        log.warning("error ignored in rollback on %s: %s", conn, rollback_failed)
            if conn.unreplicated:
                await conn.close()  # the pool replaces a closed connection
                if exc is None:
                    raise CommitNotReplicated()
                if isinstance(exc, Exception) and not isinstance(exc, CommitNotReplicated):
                    raise CommitNotReplicated() from exc
        finally:
            await self._pool.putconn(conn)


def create_pool(url: str, settings: Settings, **kwargs: Any) -> AsyncConnectionPool:
    """The request path's pool: autocommit, so each ledger statement is its own transaction and one round trip."""
    options = f"-c statement_timeout={settings.statement_timeout_ms}"
    round_trip_limit = (
        (settings.statement_timeout_ms + settings.replication_wait_ms) / 1000
        if settings.statement_timeout_ms > 0
        else None
    )

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        assert isinstance(conn, BillingConnection)
        conn.round_trip_limit = round_trip_limit
        _watch_replication(conn)
        billing_pool.unreachable = False

    def unreachable(_: AsyncConnectionPool) -> None:
        billing_pool.unreachable = True

    billing_pool = BillingPool(
        url,
        connection_class=BillingConnection,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.pool_timeout,
        kwargs={"autocommit": True, "options": options, "connect_timeout": 3},
        open=False,
        name="billing",
        # A broken connection (database restarted) is noticed on return and replaced in the background.
        reconnect_timeout=RECONNECT_CHAIN_SECONDS,
        reconnect_failed=unreachable,
        configure=configure,
        **kwargs,
    )
    return billing_pool


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)
