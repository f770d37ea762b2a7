"""`billing`: serve the API, migrate, and the operator's commands (which go through the same ledger code)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID, uuid4

import typer

from billing_service import db
from billing_service.allowances import rules as allowances
from billing_service.callers import rules as callers
from billing_service.errors import BillingError
from billing_service.events import config as events_config
from billing_service.events import dispatcher
from billing_service.events import rules as events
from billing_service.grants import rules as grants
from billing_service.holds import rules as holds
from billing_service.ledger import rules as ledger
from billing_service.ledger.schemas import MAX_AMOUNT
from billing_service.logs import configure_logging
from billing_service.settings import Settings, get_settings

app = typer.Typer(help="The token ledger of the agent platform.", no_args_is_help=True, add_completion=False)
tokens_app = typer.Typer(help="Named, scoped service tokens kept in the database.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
# The API's bounds, so an operator's typo is refused here instead of by a database constraint.
Amount = Annotated[int, typer.Argument(min=1, max=MAX_AMOUNT, help="Tokens, from 1 to 2^53-1.")]
T = TypeVar("T")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _database_url(settings: Settings) -> str:
    try:
        return db.resolve_database_url(settings)
    except db.DatabaseNotReady as exc:  # a malformed DATABASE_URL
        raise _fail(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any failure to start embedded PostgreSQL is fatal here
        raise _fail(f"could not start the embedded PostgreSQL in {settings.data_dir}: {exc}") from exc


def _ready_database_url(settings: Settings) -> str:
    """The URL of a reachable database whose schema is current, or a clear error."""
    url = _database_url(settings)
    try:
        pending = db.pending_migrations(url)
    except db.DatabaseNotReady as exc:
        raise _fail(str(exc)) from exc
    if pending:
        raise _fail(f"the database lacks migrations {', '.join(pending)}; run `billing migrate` first")
    return url


def _secret_in_data_dir(data_dir: Path, name: str) -> str:
    """A generated secret, created once and kept (mode 0600) so restarts keep the same credentials."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _run(settings: Settings, url: str, action: Callable[[Any], Awaitable[T]]) -> T:
    events_config.configure(settings)

    async def main() -> T:
        pool = db.create_pool(url, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}))
        await pool.open(wait=True, timeout=10)
        try:
            return await action(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(main())
    except BillingError as exc:
        raise _fail(f"{exc.detail} ({exc.code})") from exc


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    server: Annotated[
        Literal["granian", "uvicorn"], typer.Option(help="The HTTP server; both run the same ASGI app.")
    ] = "granian",
) -> None:
    """Apply migrations (under an advisory lock), then serve the API."""
    settings = get_settings()
    tokens = [token.get_secret_value() for token in settings.service_tokens]
    try:
        env_names = [token.name for token, _ in callers.parse_env_tokens(tokens)]
    except callers.TokenConfigError as exc:
        raise _fail(str(exc)) from exc
    url = _database_url(settings)
    try:
        db.migrate(url)
        with db.connect(url) as conn:
            db_names = callers.token_names(conn)
    except db.DatabaseNotReady as exc:
        raise _fail(str(exc)) from exc
    if clash := sorted(set(env_names) & db_names):
        raise _fail(
            f"token name(s) {', '.join(clash)} are in BILLING_SERVICE_TOKENS and in the database "
            "(`billing tokens list`); rename the env entries: a name must mean one token"
        )
    if not settings.embedded and not tokens and not db_names:
        raise _fail(
            "DATABASE_URL points at an external database but BILLING_SERVICE_TOKENS is empty and the database "
            "holds no token; refusing to start an API nobody could call safely. "
            "Set BILLING_SERVICE_TOKENS=<name>:<scopes>:<token>[,...] or run `billing tokens create`."
        )

    jwt_secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    generated = None
    if settings.embedded and not tokens:
        generated = _secret_in_data_dir(settings.data_dir, "service_token")
        tokens = [generated]
    if settings.embedded:
        jwt_secret = jwt_secret or _secret_in_data_dir(settings.data_dir, "jwt_secret")

    # Workers are fresh processes: hand them the resolved database and credentials through the environment.
    os.environ["DATABASE_URL"] = url
    os.environ["BILLING_SERVICE_TOKENS"] = ",".join(tokens)
    if jwt_secret:
        os.environ["BILLING_JWT_SECRET"] = jwt_secret
    os.environ.setdefault("BILLING_LOG_FORMAT", "console" if settings.embedded else "json")
    get_settings.cache_clear()

    base = f"http://{host}:{port}"
    typer.echo(f"billing_service on {base}  (docs: {base}/docs, {workers} worker(s))")
    if settings.embedded:
        typer.echo(f"embedded PostgreSQL, data in {settings.data_dir.resolve()}")
    if generated is not None:
        typer.echo(f"service token: {generated}")
        typer.echo(
            f"try:  curl -s -X POST {base}/billing/credit-tokens -H 'Authorization: Bearer {generated}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"user_id": "6f1c1f0e-2b7a-4a53-9d2e-2b8f7f0c9a01", "amount": 100, "description": "welcome"}\''
        )
    sys.stdout.flush()
    # Before any worker (or, with one worker, the app) imports prometheus_client, which reads this at import.
    metrics_dir, made_metrics_dir = _prepare_metrics_dir()
    settings = get_settings()
    configure_logging(
        log_format=settings.log_format or "json", level=settings.log_level, secrets=settings.secret_values()
    )
    try:
        (_serve_granian if server == "granian" else _serve_uvicorn)(host, port, workers, settings.log_level)
    finally:
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


APP = "billing_service.app:create_app"


def _serve_granian(host: str, port: int, workers: int, log_level: str) -> None:
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    Server(
        APP,
        factory=True,
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        log_level=LogLevels(log_level),
        # granian's own lines propagate to the root handler that billing_service.logs installed: one format.
        log_dictconfig={
            "version": 1,
            "disable_existing_loggers": False,
            "loggers": {
                "_granian": {"handlers": [], "propagate": True},
                "granian.access": {"handlers": [], "propagate": False},
            },
        },
        log_access=False,  # the edge logs each request, with its request id
        # A worker killed by the OS (OOM, kill -9) is replaced at once; its in-flight requests were not
        # acknowledged, and their retries with the same Idempotency-Key are safe.
        respawn_failed_workers=True,
        respawn_interval=0.1,
        workers_kill_timeout=30,
    ).serve()


def _serve_uvicorn(host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,  # the app routes uvicorn's records through structlog (billing_service.logs)
        log_level=log_level,
        access_log=False,  # the edge logs each request, with its request id
        timeout_keep_alive=5,
    )


def _prepare_metrics_dir() -> tuple[Path, bool]:
    """An empty PROMETHEUS_MULTIPROC_DIR for this run's workers, and whether we made it (and so remove it).

    Samples left by an earlier run would be added to this run's counters, so an operator's directory is
    emptied of them and, when none is configured, a fresh temporary one is made.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
        return directory, False
    directory = Path(tempfile.mkdtemp(prefix="billing-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory, True


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    settings = get_settings()
    url = _database_url(settings)
    try:
        pending = db.pending_migrations(url)
        db.migrate(url)
    except db.DatabaseNotReady as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"applied {', '.join(pending)}" if pending else "schema is current")


def _posted_line(posted: ledger.Posted) -> str:
    replay = " (replayed)" if posted.replayed else ""
    grant = f", grant {posted.grant_id}" if posted.grant_id else ""
    return f"transaction {posted.transaction_id}: balance {posted.balance}{grant}{replay}"


Description = Annotated[str, typer.Option("--description", "-d", help="1 to 1,000 characters.")]
IdempotencyKey = Annotated[str | None, typer.Option("--idempotency-key", help="1 to 255 characters.")]


def _cli_caller() -> str:
    """What the ledger records as `posted_by` for an operator's command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return f"cli:uid-{os.getuid()}"


def _post_from_cli(
    operation: Callable[..., Awaitable[ledger.Posted]],
    user_id: UUID,
    amount: int,
    description: str,
    idempotency_key: str | None,
    **terms: ledger.GrantTerms,
) -> None:
    """Credit or charge through the same ledger function as the API, with the API's bounds."""
    if not 1 <= len(description) <= 1000:
        raise _fail("the description must be 1 to 1,000 characters")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise _fail("the idempotency key must be 1 to 255 characters")
    settings = get_settings()
    posted = _run(
        settings,
        _ready_database_url(settings),
        lambda pool: operation(
            pool,
            user_id=user_id,
            amount=amount,
            description=description,
            idempotency_key=idempotency_key,
            posted_by=_cli_caller(),
            **terms,
        ),
    )
    typer.echo(_posted_line(posted))


@app.command()
def credit(
    user_id: UUID,
    amount: Amount,
    description: Description = "operator credit",
    idempotency_key: IdempotencyKey = None,
    priority: Annotated[int, typer.Option(min=0, max=100, help="0..100; lower is spent first.")] = 50,
    category: Annotated[str, typer.Option(help="paid or promotional.")] = "paid",
    expires_at: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%dT%H:%M:%S%z"], help="When the grant's unspent tokens expire (with an offset)."),
    ] = None,
) -> None:
    """Credit tokens to a user as a grant (opens the account if needed)."""
    if category not in ("paid", "promotional"):
        raise _fail("the category must be paid or promotional")
    terms = ledger.GrantTerms(priority=priority, category=category, expires_at=expires_at)
    _post_from_cli(ledger.credit, user_id, amount, description, idempotency_key, terms=terms)


@app.command()
def charge(
    user_id: UUID, amount: Amount, description: Description = "operator charge", idempotency_key: IdempotencyKey = None
) -> None:
    """Debit tokens from a user; refused if the balance does not cover it."""
    _post_from_cli(ledger.charge, user_id, amount, description, idempotency_key)


@app.command()
def balance(user_id: UUID) -> None:
    """Print a user's balance."""
    settings = get_settings()
    account = _run(
        settings, _ready_database_url(settings), lambda pool: ledger.balance_with_holds(pool, user_id=user_id)
    )
    typer.echo(f"{account.user_id}: {account.balance}")


@app.command()
def history(user_id: UUID, limit: Annotated[int, typer.Option(min=1, max=1000)] = 20) -> None:
    """Print a user's newest transactions, one JSON object per line."""
    settings = get_settings()
    rows, _ = _run(
        settings, _ready_database_url(settings), lambda pool: ledger.history_page(pool, user_id=user_id, limit=limit)
    )
    for row in rows:
        typer.echo(json.dumps(json.loads(row)))


@app.command()
def audit() -> None:
    """Check every balance against its ledger and every balance_after chain. Exits 1 on any drift."""
    settings = get_settings()
    url = _ready_database_url(settings)
    try:
        with db.connect(url) as conn:
            accounts, findings = ledger.audit(conn)
            hold_findings = holds.audit(conn)
            grant_findings = grants.audit(conn)
            allowance_findings = allowances.audit(conn)
            unattributed = ledger.unattributed_rows(conn)
    except Exception as exc:  # noqa: BLE001 - report any database failure as a clear error
        raise _fail(f"audit could not run: {exc}") from exc
    for finding in findings:
        typer.echo(
            f"DRIFT {finding.user_id}: balance {finding.balance}, ledger sum {finding.ledger_sum}, "
            f"broken balance_after links {finding.broken_links}, seq gaps {finding.seq_gaps}"
        )
    for user_id, hold_id, problem in hold_findings:
        typer.echo(f"HOLD DRIFT {user_id}{f' hold {hold_id}' if hold_id else ''}: {problem}")
    for user_id, grant_id, problem in grant_findings:
        typer.echo(f"GRANT DRIFT {user_id}{f' grant {grant_id}' if grant_id else ''}: {problem}")
    for user_id, allowance_id, problem in allowance_findings:
        typer.echo(f"ALLOWANCE DRIFT {user_id} allowance {allowance_id}: {problem}")
    if unattributed:
        # A warning, not drift: rows written before migration 0004 never had a recorded caller.
        typer.echo(f"warning: {unattributed} ledger rows have no recorded caller (posted_by)")
    if findings or hold_findings or grant_findings or allowance_findings:
        typer.echo(
            f"audit: {len(findings)} of {accounts} accounts drift, {len(hold_findings)} hold problems, "
            f"{len(grant_findings)} grant problems, {len(allowance_findings)} allowance problems"
        )
        raise typer.Exit(code=1)
    typer.echo(
        f"audit: {accounts} accounts, all balances equal their ledgers, all chains consistent, "
        "all holds and grants add up, no allowance period granted twice"
    )


@app.command()
def demo(
    user_id: Annotated[UUID | None, typer.Option(help="The new demo account's user id (default: a fresh one).")] = None,
) -> None:
    """Seed a realistic new account (a month of agent runs on three models, top-ups, open holds) for the console."""
    from billing_service.console import demo as console_demo

    settings = get_settings()
    url = _ready_database_url(settings)
    chosen = user_id or uuid4()
    summary = _run(settings, url, lambda pool: console_demo.seed(pool, user_id=chosen))
    typer.echo(
        f"demo account {summary.user_id}: {summary.transactions} transactions, {summary.runs} runs, "
        f"balance {summary.balance}, held {summary.held}"
    )
    typer.echo(f"see it at /console/accounts/{summary.user_id} (a user JWT: `billing user-token {summary.user_id}`)")


@app.command("user-token")
def user_token(user_id: UUID, ttl_seconds: Annotated[int, typer.Option(min=1)] = 3600) -> None:
    """Mint a user JWT (HS256, BILLING_JWT_SECRET or the embedded one) for reading that user's account."""
    import time

    import jwt

    settings = get_settings()
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    if secret is None and settings.embedded:
        secret = _secret_in_data_dir(settings.data_dir, "jwt_secret")
    if secret is None:
        raise _fail("BILLING_JWT_SECRET is not set")
    now = int(time.time())
    typer.echo(jwt.encode({"sub": str(user_id), "iat": now, "exp": now + ttl_seconds}, secret, algorithm="HS256"))


@app.command()
def dispatch() -> None:
    """Run the webhook dispatcher (and the hold and grant sweeps, and allowance grants) here, until interrupted.

    Several may run: one leads at a time (an advisory lock), the others stand by. Pair it with
    BILLING_DISPATCHER=false on `billing serve` to keep deliveries out of the API's processes."""
    settings = get_settings()
    url = _ready_database_url(settings)
    events_config.configure(settings)
    configure_logging(
        log_format=settings.log_format or "console", level=settings.log_level, secrets=settings.secret_values()
    )

    async def main() -> None:
        pool = db.create_pool(url, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 4}))
        await pool.open(wait=False)
        try:
            await dispatcher.run(url, pool, settings)
        finally:
            await pool.close()

    typer.echo("billing dispatch: delivering webhooks", err=True)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


@app.command("grant-allowances")
def grant_allowances() -> None:
    """Grant every allowance period that has started and is not granted yet, once (the dispatcher does this
    every BILLING_ALLOWANCE_GRANT_INTERVAL seconds). Safe beside running dispatchers: never grants twice."""
    settings = get_settings()
    granted = _run(settings, _ready_database_url(settings), allowances.grant_due_periods)
    typer.echo(f"granted {granted} allowance periods")


webhooks_app = typer.Typer(help="Webhooks: replay events, read the delivery log.", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise _fail(f"--{name}: give a time zone offset, e.g. 2026-01-01T00:00:00+00:00")
    return value


@webhooks_app.command("replay")
def webhooks_replay(
    webhook_id: UUID,
    since: Annotated[str | None, typer.Option(help="Inclusive, RFC 3339 with offset.")] = None,
    until: Annotated[str | None, typer.Option(help="Exclusive, RFC 3339 with offset.")] = None,
    event_id: Annotated[
        list[UUID] | None, typer.Option("--event-id", help="An event to send again (repeatable).")
    ] = None,
) -> None:
    """Send events to the webhook again: those created in [since, until), or the given --event-id ones."""
    try:
        parsed = [datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None for value in (since, until)]
    except ValueError as exc:
        raise _fail(f"since/until: not an RFC 3339 time ({exc})") from exc
    start, end = _aware(parsed[0], "since"), _aware(parsed[1], "until")
    settings = get_settings()
    count = _run(
        settings,
        _ready_database_url(settings),
        lambda pool: events.replay(pool, webhook_id=webhook_id, since=start, until=end, event_ids=event_id or None),
    )
    typer.echo(f"replaying {count} deliveries")


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: UUID,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
) -> None:
    """Print the webhook's newest deliveries with their attempts, one JSON object per line."""
    if status is not None and status not in ("pending", "delivered", "failed"):
        raise _fail("--status must be pending, delivered or failed")
    settings = get_settings()
    rows, _ = _run(
        settings,
        _ready_database_url(settings),
        lambda pool: events.deliveries(pool, webhook_id=webhook_id, status=status, limit=limit, cursor=None),
    )
    for row in rows:
        typer.echo(json.dumps(json.loads(row)))


def _env_token_names(settings: Settings) -> list[str]:
    try:
        return [
            token.name for token, _ in callers.parse_env_tokens(t.get_secret_value() for t in settings.service_tokens)
        ]
    except callers.TokenConfigError as exc:
        raise _fail(str(exc)) from exc


@tokens_app.command("create")
def tokens_create(
    name: str,
    scopes: Annotated[str, typer.Option(help="Of charge, credit, read, admin, joined with '+': charge+read.")],
) -> None:
    """Make a service token; its secret is printed once (only its SHA-256 is stored)."""
    try:
        callers.check_name(name)
        wanted = callers.parse_scopes(scopes.replace(",", "+"))
    except callers.TokenConfigError as exc:
        raise _fail(str(exc)) from exc
    settings = get_settings()
    reserved = _env_token_names(settings)
    token, info = _run(
        settings,
        _ready_database_url(settings),
        lambda pool: callers.create_token(pool, name=name, scopes=wanted, reserved=reserved),
    )
    typer.echo(f"token {info.name} ({'+'.join(info.scopes)}), usable by every worker within a second:", err=True)
    typer.echo(token)


@tokens_app.command("list")
def tokens_list() -> None:
    """Every database token (never its secret): name, scopes, created, last used, revoked."""
    settings = get_settings()
    found = _run(settings, _ready_database_url(settings), callers.list_tokens)
    for info in found:
        columns = [info.name, "+".join(info.scopes), f"created {info.created_at:%Y-%m-%d %H:%M:%S%z}"]
        columns.append(f"last used {info.last_used_at:%Y-%m-%d %H:%M:%S%z}" if info.last_used_at else "never used")
        if info.revoked_at:
            columns.append(f"revoked {info.revoked_at:%Y-%m-%d %H:%M:%S%z}")
        typer.echo("\t".join(columns))
    for name in _env_token_names(settings):
        typer.echo(f"{name}\t(from BILLING_SERVICE_TOKENS)")


@tokens_app.command("revoke")
def tokens_revoke(name: str) -> None:
    """Revoke a database token: every worker refuses it within a second. Its name is never reused."""
    settings = get_settings()
    _run(settings, _ready_database_url(settings), lambda pool: callers.revoke_token(pool, name=name))
    typer.echo(f"revoked {name}")
