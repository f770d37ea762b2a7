"""The web console at /console: server-rendered pages over the ledger's, holds' and events' rules.

Read-only. No SQL here (sessions are `console.sessions`); every figure comes from the same rules functions the
API calls. The edge does not authenticate /console (it checks `/billing` first and only): a console request
carries a session cookie instead of a token, checked here. See docs/console.md.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode
from uuid import UUID

import jwt
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from psycopg_pool import AsyncConnectionPool

from billing_service.allowances import rules as allowances
from billing_service.console import sessions
from billing_service.console.sessions import Session
from billing_service.errors import AccountNotFound, BillingError, HoldNotFound
from billing_service.events import rules as events
from billing_service.grants import rules as grants_rules
from billing_service.holds import rules as holds
from billing_service.ledger import rules as ledger
from billing_service.settings import Settings

router = APIRouter(prefix="/console", include_in_schema=False)

COOKIE = "billing_console"
SIGN_IN_COOKIE = "billing_console_sign_in"
HISTORY_PAGE_SIZE = 25
_HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Read once: a fixed set of files, served from memory by name (no path ever reaches the file system).
_STATIC = {
    str(path.relative_to(_HERE / "static")): (path.read_bytes(), _STATIC_TYPES[path.suffix])
    for path in (_HERE / "static").rglob("*")
    if path.suffix in _STATIC_TYPES
}


def _tokens(value: int | None) -> str:
    return "—" if value is None else f"{value:,}".replace(",", "\u202f")


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_templates.filters["tokens"] = _tokens
_templates.filters["when"] = _when


class _SignIn(Exception):
    """No live session: send the browser to the sign-in page."""


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _pool(request: Request) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = request.app.state.pool
    return pool


def _key(request: Request) -> bytes:
    key: bytes | None = getattr(request.app.state, "console_key", None)
    if key is None:
        key = request.app.state.console_key = sessions.signing_key(_settings(request))
    return key


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _harden(response: Response, *, cache: str = "no-store") -> Response:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = cache
    return response


def _page(request: Request, template: str, code: int = 200, **context: Any) -> Response:
    html = _templates.get_template(template).render(**context)
    return _harden(HTMLResponse(html, status_code=code))


def _redirect(url: str) -> Response:
    return _harden(RedirectResponse(url, status_code=303))


async def _session(request: Request) -> Session:
    session_id = sessions.parse_cookie(_key(request), request.cookies.get(COOKIE))
    if session_id is None:
        raise _SignIn()
    session = await sessions.lookup(_pool(request), session_id)
    if session is None:
        raise _SignIn()
    return session


def _chrome(request: Request, session: Session) -> dict[str, Any]:
    """What every signed-in page's header needs."""
    return {"session": session, "csrf": sessions.csrf_token(_key(request), session.id)}


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        return {name: values[0] for name, values in parse_qs(body, max_num_fields=10).items()}
    except ValueError:  # more fields than any console form has
        return {}


def _signed_in_elsewhere(request: Request, session: Session, message: str, status: int) -> Response:
    return _page(request, "error.html", status, message=message, status=status, **_chrome(request, session))


# ---------------------------------------------------------------------------------------------------------
# Sign-in and sign-out


@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    try:
        session = await _session(request)
    except _SignIn:
        return _redirect("/console/sign-in")
    return _redirect("/console/accounts" if session.service else f"/console/accounts/{session.user_id}")


def _sign_in_form(request: Request, *, error: str | None = None, status: int = 200) -> Response:
    nonce = sessions.new_nonce()
    response = _page(
        request,
        "sign_in.html",
        status,
        error=error,
        csrf=sessions.csrf_token(_key(request), "sign-in." + nonce),
    )
    response.set_cookie(
        SIGN_IN_COOKIE, nonce, max_age=900, path="/console", httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return _sign_in_form(request)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await _form(request)
    nonce = request.cookies.get(SIGN_IN_COOKIE) or ""
    if not nonce or not sessions.csrf_ok(_key(request), "sign-in." + nonce, form.get("csrf")):
        return _sign_in_form(request, error="The form expired; please sign in again.", status=400)
    settings = _settings(request)
    token = form.get("token", "").strip()
    try:
        caller = await request.app.state.authenticator.authenticate(f"Bearer {token}")
    except BillingError:
        return _sign_in_form(request, error="That token is not valid.", status=401)
    if caller.service and "read" not in caller.scopes:
        return _sign_in_form(request, error="That token has no read scope.", status=403)
    seconds = settings.console_session_seconds
    if caller.service:
        subject = "service token " + sessions.token_fingerprint(token)
    else:
        subject = f"user {caller.user_id}"
        # A session never outlives the JWT it was exchanged for.
        expires = int(jwt.decode(token, options={"verify_signature": False})["exp"])
        seconds = max(1, min(seconds, expires - int(time.time())))
    session, expires_at = await sessions.create(
        _pool(request), service=caller.service, user_id=caller.user_id, subject=subject, seconds=seconds
    )
    response = _redirect("/console/accounts" if caller.service else f"/console/accounts/{caller.user_id}")
    response.set_cookie(
        COOKIE,
        sessions.cookie_value(_key(request), session.id, expires_at),
        max_age=seconds,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    try:
        session = await _session(request)
    except _SignIn:
        return _redirect("/console/sign-in")
    form = await _form(request)
    if not sessions.csrf_ok(_key(request), session.id, form.get("csrf")):
        return _signed_in_elsewhere(request, session, "The form expired; reload the page and try again.", 400)
    await sessions.revoke(_pool(request), session.id)
    response = _redirect("/console/sign-in")
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict", secure=_secure(request))
    return response


# ---------------------------------------------------------------------------------------------------------
# Pages


@router.get("/accounts")
async def accounts(request: Request, q: str | None = None) -> Response:
    try:
        session = await _session(request)
    except _SignIn:
        return _redirect("/console/sign-in")
    if not session.service:
        return _redirect(f"/console/accounts/{session.user_id}")
    pool = _pool(request)
    found, error = None, None
    query = (q or "").strip()
    if query:
        try:
            found = await ledger.find_accounts(pool, prefix=query, limit=20)
        except BillingError as exc:
            error = exc.detail
    recent = await ledger.recent_accounts(pool, limit=20)
    return _page(
        request,
        "accounts.html",
        400 if error else 200,
        q=query,
        found=found,
        recent=recent,
        error=error,
        **_chrome(request, session),
    )


def _day(value: str, *, end: bool) -> datetime:
    """A date (the whole UTC day; `end` is exclusive, so the day is included) or an RFC 3339 time."""
    try:
        if len(value) == 10:
            start = datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{'until' if end else 'since'}: give a date (YYYY-MM-DD) or an RFC 3339 time.") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _history_filters(params: dict[str, str]) -> tuple[dict[str, object], dict[str, str], str | None]:
    """(the filters for ledger.history_page, the form's values to show again, an error)."""
    shown = {name: params.get(name, "").strip() for name in ("type", "run_id", "since", "until")}
    filters: dict[str, object] = {}
    try:
        if shown["type"]:
            if shown["type"] not in ("debit", "credit", "capture"):
                raise ValueError("type: debit, credit or capture.")
            filters["type"] = shown["type"]
        if shown["run_id"]:
            if "\x00" in shown["run_id"] or len(shown["run_id"]) > 1000:
                raise ValueError("run_id: at most 1000 characters, no NUL.")
            filters["run_id"] = shown["run_id"]
        if shown["since"]:
            filters["since"] = _day(shown["since"], end=False)
        if shown["until"]:
            filters["until"] = _day(shown["until"], end=True)
    except ValueError as exc:
        return {}, shown, str(exc)
    return filters, shown, None


def _chart_data(
    series: list[ledger.BalancePoint], by_day_model: list[dict[str, Any]], by_run: list[dict[str, Any]]
) -> dict[str, Any]:
    days = sorted({g["group"]["day"] for g in by_day_model})
    models = sorted({g["group"]["model"] or "(no model)" for g in by_day_model})
    stacked = {model: [0] * len(days) for model in models}
    for g in by_day_model:
        stacked[g["group"]["model"] or "(no model)"][days.index(g["group"]["day"])] += g["tokens"]
    runs = sorted(by_run, key=lambda g: g["tokens"], reverse=True)[:12]
    return {
        "balance": {"t": [p.at.timestamp() * 1000 for p in series], "v": [p.balance for p in series]},
        "daily": {"days": days, "models": [{"model": m, "values": stacked[m]} for m in models]},
        "runs": [{"run_id": g["group"] or "(no run)", "tokens": g["tokens"]} for g in runs],
    }


def _expiry(grant: grants_rules.Grant) -> datetime:
    assert grant.expires_at is not None
    return grant.expires_at


async def _hold_trees(pool: AsyncConnectionPool, user_id: UUID) -> list[holds.HoldNode]:
    active = await holds.list_holds(pool, user_id=user_id, status="active", limit=100)
    trees: list[holds.HoldNode] = []
    for hold in active:
        if hold.parent_id is None and len(trees) < 10:
            try:
                trees.append(await holds.hold_tree(pool, hold_id=hold.hold_id))
            except HoldNotFound:  # pragma: no cover - holds are never deleted
                continue
    return trees


@router.get("/accounts/{user_id}")
async def account(request: Request, user_id: UUID) -> Response:
    try:
        session = await _session(request)
    except _SignIn:
        return _redirect("/console/sign-in")
    if not session.service and session.user_id != user_id:
        return _signed_in_elsewhere(request, session, "You may see only your own account.", 403)
    pool = _pool(request)
    params = dict(request.query_params)
    filters, shown, error = _history_filters(params)
    cursor = params.get("cursor") or None
    try:
        current = await ledger.balance_with_holds(pool, user_id=user_id)
        try:
            rows, next_cursor = await ledger.history_page(
                pool, user_id=user_id, limit=HISTORY_PAGE_SIZE, cursor=cursor, filters=filters
            )
        except BillingError as exc:  # a cursor this service did not issue
            rows, next_cursor, error = [], None, exc.detail
        month_ago = datetime.now(UTC) - timedelta(days=31)
        series = await ledger.balance_series(pool, user_id=user_id, limit=1000)
        by_day_model = await ledger.usage(pool, user_id=user_id, group_by="day,model", since=month_ago, until=None)
        by_run = await ledger.usage(pool, user_id=user_id, group_by="run_id", since=month_ago, until=None)
    except AccountNotFound:
        return _signed_in_elsewhere(request, session, "No account with that user id.", 404)
    trees = await _hold_trees(pool, user_id)
    live_grants = await grants_rules.live_grants(pool, user_id=user_id)
    # Running ones first; a stopped one still shows what it granted last.
    account_allowances = sorted(
        await allowances.user_allowances(pool, user_id=user_id), key=lambda a: (a.stopped_at is not None, a.created_at)
    )
    recent_events = [json.loads(row) for row in await events.recent(pool, user_id=user_id, limit=15)]
    kept = {name: value for name, value in shown.items() if value}
    return _page(
        request,
        "account.html",
        400 if error else 200,
        user_id=user_id,
        balance=current,
        # The live grants that expire, soonest first: what the user will lose if it is not spent.
        grants=sorted((g for g in live_grants if g.expires_at is not None and g.remaining), key=_expiry),
        history=[json.loads(row) for row in rows],
        filters=shown,
        error=error,
        older=f"?{urlencode({**kept, 'cursor': next_cursor})}" if next_cursor else None,
        newest=f"?{urlencode(kept)}" if cursor else None,
        trees=trees,
        allowances=account_allowances,
        now=datetime.now(UTC),
        events=recent_events,
        charts=_chart_data(series, [json.loads(g) for g in by_day_model], [json.loads(g) for g in by_run]),
        **_chrome(request, session),
    )


@router.get("/webhooks")
async def webhooks(request: Request) -> Response:
    try:
        session = await _session(request)
    except _SignIn:
        return _redirect("/console/sign-in")
    if not session.service:
        return _signed_in_elsewhere(request, session, "Webhooks are for services only.", 403)
    pool = _pool(request)
    listed = []
    for webhook in await events.list_webhooks(pool):
        rows, _ = await events.deliveries(pool, webhook_id=webhook.id, status=None, limit=10, cursor=None)
        listed.append((webhook, [json.loads(row) for row in rows]))
    return _page(request, "webhooks.html", webhooks=listed, **_chrome(request, session))


@router.get("/static/{name:path}")
async def static(name: str) -> Response:
    found = _STATIC.get(name)
    if found is None:
        return _harden(Response("Not found", status_code=404, media_type="text/plain"))
    body, media_type = found
    return _harden(Response(body, media_type=media_type), cache="public, max-age=300")
