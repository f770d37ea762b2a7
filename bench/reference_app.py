"""The bench's reference app: the service's hot routes as a bare ASGI app, the ceiling of what Python can cost.

Never shipped; only the bench starts it. No framework, no middleware, no logging, no metrics: a bearer-token
check, strict msgspec bodies, and the service's EXACT statements, imported from the package (never copied),
so the gap between this app and the service is what the service's own Python costs.

    POST /billing/charge-tokens              ledger_sql.CHARGE
    GET  /billing/balance/{user_id}          ledger_sql.BALANCE_WITH_HOLDS
    POST /billing/holds/{hold_id}/capture    one transaction: holds_sql.LOCK_TREE, SWEEP_TREE, HOLD_CAPTURE, HOLD
    GET  /readyz                             SELECT 1

Environment: DATABASE_URL, REF_TOKEN (the accepted bearer token), REF_DRIVER (psycopg, the default, or
asyncpg), REF_POOL_SIZE (connections per worker, default 16: the service's BILLING_POOL_MAX_SIZE default).
Serve it with granian (`granian --interface asgi --loop uvloop --working-dir bench reference_app:app`) or
uvicorn (`uvicorn --app-dir bench --loop uvloop --http httptools reference_app:app`).

Left out on purpose (the bench never exercises them): the retry of a refused charge after sweeping expired
holds, JWT callers, and a capture's key racing a plain charge with the same key.
"""

from __future__ import annotations

import hmac
import os
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import msgspec

from billing_service.db import configure_psycopg
from billing_service.holds import sql as holds_sql
from billing_service.idempotency import request_hash
from billing_service.ledger import sql as ledger_sql

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_AMOUNT = 2**53 - 1
MAX_BODY_BYTES = 64 * 1024
MAX_METADATA_BYTES = 4096
TOKEN = os.environ.get("REF_TOKEN", "").encode()
DRIVER = os.environ.get("REF_DRIVER", "psycopg")
POOL_SIZE = int(os.environ.get("REF_POOL_SIZE", "16"))
# The service's defaults: the outbox on, and a caller recorded on every ledger row.
OUTBOX_AND_CALLER = {"events": True, "posted_by": "reference", "request_id": None}

Amount = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
Description = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


class ChargeBody(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    amount: Amount
    description: Description
    metadata: dict[str, Any] | None = None


class CaptureBody(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount
    description: Description | None = None
    metadata: dict[str, Any] | None = None
    final: bool = False
    allow_overrun: bool = False


# The service's own psycopg settings: HOLD_CAPTURE's placeholder conversion cached, jsonb through msgspec.
configure_psycopg()

CHARGE_DECODER = msgspec.json.Decoder(ChargeBody)
CAPTURE_DECODER = msgspec.json.Decoder(CaptureBody)
encode = msgspec.json.Encoder().encode


class Refused(Exception):
    """An answer other than 200: status, detail and code, in the service's error shape."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        self.status, self.detail, self.code = status, detail, code


def _checked_metadata(metadata: dict[str, Any] | None) -> bytes | None:
    """The metadata as JSON, refused as the service refuses it (size, NUL, usage field types)."""
    if metadata is None:
        return None
    try:
        text = encode(metadata)
    except (TypeError, ValueError) as exc:  # NaN/Infinity cannot come from msgspec's JSON; surrogates can
        raise Refused(422, f"metadata: {exc}", "validation_error") from exc
    if len(text) > MAX_METADATA_BYTES or b"\\u0000" in text:
        raise Refused(422, f"metadata: must be at most {MAX_METADATA_BYTES} bytes of JSON, no NUL", "validation_error")
    for key in ("run_id", "model"):
        if key in metadata and not isinstance(metadata[key], str):
            raise Refused(422, f"metadata: {key} must be a string", "validation_error")
    for key in ("input_tokens", "output_tokens", "cached_tokens"):
        if key in metadata:
            count = metadata[key]
            if type(count) is not int or not 0 <= count <= MAX_AMOUNT:
                raise Refused(422, f"metadata: {key} must be an integer from 0 to {MAX_AMOUNT}", "validation_error")
    return text


def _description(value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise Refused(422, "description: must not contain the NUL character", "validation_error")


# ---------------------------------------------------------------------------------------------------------
# Drivers: each runs the three operations and returns plain rows (tuples or asyncpg Records).


class UniqueKeyRace(Exception):
    """A concurrent twin with the same Idempotency-Key committed first; the statement rolled back whole."""


class PsycopgDriver:
    def __init__(self) -> None:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.types.json import set_json_loads
        from psycopg_pool import AsyncConnectionPool

        class RawJsonbDumper(Dumper):
            oid = psycopg.adapters.types["jsonb"].oid

            def dump(self, obj: Any) -> bytes:
                return bytes(obj)

        psycopg.adapters.register_dumper(RawJsonb, RawJsonbDumper)
        set_json_loads(msgspec.json.decode)
        self.unique_violation = psycopg.errors.UniqueViolation
        self.pool = AsyncConnectionPool(
            os.environ["DATABASE_URL"],
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "prepare_threshold": 0},
            open=False,
        )

    async def open(self) -> None:
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def one(self, statement: str, params: dict[str, Any]) -> Any:
        async with self.pool.connection() as conn:
            try:
                cursor = await conn.execute(statement, params)
            except self.unique_violation as exc:
                raise UniqueKeyRace() from exc
            return await cursor.fetchone()

    async def capture(self, hold_id: uuid.UUID, params: dict[str, Any]) -> tuple[Any, Any] | None:
        """(HOLD_CAPTURE's outcome row, the hold row after it), or None when there is no such hold."""
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    cursor = await conn.execute(holds_sql.LOCK_TREE, {"hold_id": hold_id})
                    tree = await cursor.fetchone()
                    if tree is None:
                        return None
                    params["user_id"], params["root_id"] = tree
                    await conn.execute(holds_sql.SWEEP_TREE, {"user_id": tree[0], "root_id": tree[1], "events": True})
                    cursor = await conn.execute(holds_sql.HOLD_CAPTURE, params)
                    outcome = await cursor.fetchone()
                    cursor = await conn.execute(holds_sql.HOLD, {"hold_id": hold_id})
                    return outcome, await cursor.fetchone()
            except self.unique_violation as exc:
                raise UniqueKeyRace() from exc


class RawJsonb(bytes):
    """JSON text already encoded (by msgspec), bound as jsonb without a second encoding."""


def positional(statement: str) -> tuple[str, tuple[str, ...]]:
    """A %(name)s statement as asyncpg's $n form, and the parameter names in $n order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return re.sub(r"%\((\w+)\)s", number, statement), tuple(names)


class AsyncpgDriver:
    """The same statements through asyncpg, converted to $n placeholders once, at import."""

    # Keyed by the service's statement text: the routes name statements the same way for both drivers.
    STATEMENTS = {
        statement: positional(statement)
        for statement in (
            ledger_sql.CHARGE,
            ledger_sql.IDEMPOTENT_REPLAY,
            ledger_sql.BALANCE_WITH_HOLDS,
            ledger_sql.PING,
            holds_sql.LOCK_TREE,
            holds_sql.SWEEP_TREE,
            holds_sql.HOLD_CAPTURE,
            holds_sql.HOLD,
        )
    }

    def __init__(self) -> None:
        import asyncpg

        self.asyncpg = asyncpg
        self.unique_violation = asyncpg.UniqueViolationError
        self.pool: Any = None

    async def open(self) -> None:
        async def init(conn: Any) -> None:
            await conn.set_type_codec(
                "jsonb", encoder=bytes.decode, decoder=msgspec.json.decode, schema="pg_catalog", format="text"
            )

        self.pool = await self.asyncpg.create_pool(
            os.environ["DATABASE_URL"], min_size=POOL_SIZE, max_size=POOL_SIZE, init=init
        )

    async def close(self) -> None:
        await self.pool.close()

    def _call(self, statement: str, params: dict[str, Any]) -> tuple[Any, ...]:
        """(the $n text, *its arguments): what asyncpg's fetchrow and execute take."""
        text, names = self.STATEMENTS[statement]
        return (text, *(params[n] for n in names))

    async def one(self, statement: str, params: dict[str, Any]) -> Any:
        async with self.pool.acquire() as conn:
            try:
                return await conn.fetchrow(*self._call(statement, params))
            except self.unique_violation as exc:
                raise UniqueKeyRace() from exc

    async def capture(self, hold_id: uuid.UUID, params: dict[str, Any]) -> tuple[Any, Any] | None:
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    tree = await conn.fetchrow(*self._call(holds_sql.LOCK_TREE, {"hold_id": hold_id}))
                    if tree is None:
                        return None
                    params["user_id"], params["root_id"] = tree[0], tree[1]
                    await conn.execute(*self._call(holds_sql.SWEEP_TREE, params))
                    outcome = await conn.fetchrow(*self._call(holds_sql.HOLD_CAPTURE, params))
                    return outcome, await conn.fetchrow(*self._call(holds_sql.HOLD, {"hold_id": hold_id}))
            except self.unique_violation as exc:
                raise UniqueKeyRace() from exc


driver: PsycopgDriver | AsyncpgDriver | None = None


# ---------------------------------------------------------------------------------------------------------
# Routes


def _idempotency_key(headers: dict[bytes, bytes]) -> str | None:
    key = headers.get(b"idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise Refused(422, "Idempotency-Key: 1 to 255 characters", "validation_error")
    return key.decode("latin-1")


def _check_replay(stored_hash: bytes | None, digest: bytes) -> None:
    if stored_hash is None or bytes(stored_hash) != digest:
        raise Refused(422, "This Idempotency-Key was used with a different request.", "idempotency_key_reused")


async def charge(body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bool]:
    request = CHARGE_DECODER.decode(body)
    _description(request.description)
    metadata = _checked_metadata(request.metadata)
    key = _idempotency_key(headers)
    digest = request_hash(
        "charge",
        user_id=request.user_id,
        amount=request.amount,
        description=request.description,
        metadata=request.metadata,
    )
    params = {
        "user_id": request.user_id,
        "amount": request.amount,
        "description": request.description,
        "metadata": RawJsonb(metadata) if metadata is not None else None,
        "idempotency_key": key,
        "request_hash": digest if key is not None else None,
        **OUTBOX_AND_CALLER,
    }
    assert driver is not None
    try:
        outcome, transaction_id, balance, stored_hash, *_ = await driver.one(ledger_sql.CHARGE, params)
    except UniqueKeyRace:
        row = await driver.one(ledger_sql.IDEMPOTENT_REPLAY, params)
        if row is None:
            raise Refused(409, "A request with this Idempotency-Key is in flight.", "idempotency_conflict") from None
        outcome, (transaction_id, balance, stored_hash, *_) = "replayed", row
    if outcome == "account_not_found":
        raise Refused(402, "Account not found.", "account_not_found")
    if outcome == "insufficient_balance":
        raise Refused(
            402, f"The available balance is {balance}; this charge needs {request.amount}.", "insufficient_balance"
        )
    if outcome == "replayed":
        _check_replay(stored_hash, digest)
    answer = {"status": "success", "transaction_id": transaction_id, "balance": balance}
    return encode(answer), outcome == "replayed"


async def balance(user_text: str) -> bytes:
    try:
        user_id = uuid.UUID(user_text)
    except ValueError:
        raise Refused(422, "user_id: not a UUID", "validation_error") from None
    assert driver is not None
    row = await driver.one(ledger_sql.BALANCE_WITH_HOLDS, {"user_id": user_id})
    if row is None:
        raise Refused(404, "Account not found.", "account_not_found")
    held, available, expiring, next_expiry = int(row[0]), int(row[1]), int(row[2]), row[3]  # sums are numeric
    return encode(
        {
            "user_id": user_id,
            "balance": available + held,
            "held": held,
            "available": available,
            "expiring": expiring,
            "next_expiry": next_expiry,
        }
    )


_CAPTURE_REFUSALS = {
    "hold_not_found": (404, "No such hold."),
    "hold_not_active": (409, "The hold is not active."),
    "exceeds_hold": (409, "The capture exceeds what the hold has remaining."),
    "insufficient_balance": (402, "The available balance does not cover the excess."),
}
_CAPTURE_CODES = {"exceeds_hold": "capture_exceeds_hold"}


async def capture(hold_text: str, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, bool]:
    try:
        hold_id = uuid.UUID(hold_text)
    except ValueError:
        raise Refused(422, "hold_id: not a UUID", "validation_error") from None
    request = CAPTURE_DECODER.decode(body)
    _description(request.description)
    metadata = _checked_metadata(request.metadata)
    key = _idempotency_key(headers)
    digest = request_hash(
        "capture",
        hold_id=hold_id,
        amount=request.amount,
        description=request.description,
        metadata=request.metadata,
        final=request.final,
        allow_overrun=request.allow_overrun,
    )
    params = {
        "hold_id": hold_id,
        "amount": request.amount,
        "description": request.description,
        "metadata": RawJsonb(metadata) if metadata is not None else None,
        "final": request.final,
        "allow_overrun": request.allow_overrun,
        "idempotency_key": key,
        "request_hash": digest if key is not None else None,
        **OUTBOX_AND_CALLER,
    }
    assert driver is not None
    try:
        result = await driver.capture(hold_id, params)
    except UniqueKeyRace:  # the same key at the same moment on a plain charge: the service replays it
        raise Refused(409, "A request with this Idempotency-Key is in flight.", "idempotency_conflict") from None
    if result is None:
        raise Refused(404, "No such hold.", "hold_not_found")
    (outcome, transaction_id, posted, stored_hash, _), hold = result
    if outcome in _CAPTURE_REFUSALS:
        status, detail = _CAPTURE_REFUSALS[outcome]
        raise Refused(status, detail, _CAPTURE_CODES.get(outcome, outcome))
    if outcome == "replayed":
        _check_replay(stored_hash, digest)
    hold_body = {
        "hold_id": hold[0],
        "user_id": hold[1],
        "parent_id": hold[2],
        "depth": hold[4],
        "amount": hold[5],
        "remaining": hold[6],
        "captured": hold[7],
        "status": hold[8],
        "expires_at": hold[9],
        "description": hold[10],
        "metadata": hold[11],
        "created_at": hold[12],
    }
    answer = {"status": "success", "transaction_id": transaction_id, "balance": posted, "hold": hold_body}
    return encode(answer), outcome == "replayed"


# ---------------------------------------------------------------------------------------------------------
# ASGI

JSON_HEADERS = [(b"content-type", b"application/json")]
REPLAYED_HEADERS = [*JSON_HEADERS, (b"idempotent-replayed", b"true")]
CAPTURE_PATH = re.compile(r"/billing/holds/([^/]+)/capture")


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"The body is larger than {MAX_BODY_BYTES} bytes.", "payload_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON_HEADERS) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _route(scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    if path == "/readyz" and method == "GET":
        assert driver is not None
        await driver.one(ledger_sql.PING, {})
        await _respond(send, 200, b'{"status":"ready"}')
        return
    if not path.startswith("/billing/"):
        raise Refused(404, "Not Found", "not_found")
    headers = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), TOKEN) or not TOKEN:
        raise Refused(401, "The token is not valid.", "unauthorized")
    replayed = False
    if path == "/billing/charge-tokens":
        if method != "POST":
            raise Refused(405, "Method Not Allowed", "method_not_allowed")
        answer, replayed = await charge(await _body(receive), headers)
    elif path.startswith("/billing/balance/"):
        if method != "GET":
            raise Refused(405, "Method Not Allowed", "method_not_allowed")
        answer = await balance(path[len("/billing/balance/") :])
    elif (match := CAPTURE_PATH.fullmatch(path)) is not None:
        if method != "POST":
            raise Refused(405, "Method Not Allowed", "method_not_allowed")
        answer, replayed = await capture(match[1], await _body(receive), headers)
    else:
        raise Refused(404, "Not Found", "not_found")
    await _respond(send, 200, answer, REPLAYED_HEADERS if replayed else JSON_HEADERS)


async def _lifespan(receive: Receive, send: Send) -> None:
    global driver
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                driver = AsyncpgDriver() if DRIVER == "asyncpg" else PsycopgDriver()
                await driver.open()
            except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if driver is not None:
                await driver.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    try:
        await _route(scope, receive, send)
    except Refused as refused:
        await _respond(send, refused.status, encode({"detail": refused.detail, "code": refused.code}))
    except msgspec.ValidationError as exc:
        await _respond(send, 422, encode({"detail": str(exc), "code": "validation_error"}))
    except msgspec.DecodeError as exc:
        await _respond(send, 422, encode({"detail": str(exc), "code": "invalid_json"}))
