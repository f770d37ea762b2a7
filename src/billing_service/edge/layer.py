"""The HTTP edge: one pure-ASGI pass per request, in front of everything.

For every request, in this order:
1. a request id: the caller's X-Request-ID if short and plain, else a new one; echoed on the answer and
   bound to every log line of the request;
2. authentication of /billing requests, before the body is read (401 fails closed), and the scope the route
   needs (403 insufficient_scope; `edge.auth`); /console checks its own session cookie (console/routes.py);
3. the body guard: 413 over BILLING_MAX_BODY_BYTES (from Content-Length, or as a chunked body passes it),
   415 for a write whose declared Content-Type is not JSON;
   then the per-token rate limit of writes (429 rate_limited; `edge.limits`, in memory);
4. the hot routes through the fast lane (`fast_lane`), everything else through FastAPI;
5. HTTP metrics and the access line.

One layer instead of a middleware stack: the headers are scanned once, and the hot routes never enter the
framework. No database work happens here.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from billing_service.edge import codec
from billing_service.edge.auth import (
    Authenticator,
    Caller,
    ScopeTable,
    authorize_reader,
    authorize_scope,
    authorize_service,
    required_scope,
)
from billing_service.edge.fast_lane import FastLane, FastRoute
from billing_service.edge.limits import RateLimiter
from billing_service.edge.telemetry import METHODS, HttpMetrics, route_template
from billing_service.errors import BillingError, PayloadTooLarge, RateLimited, as_billing_error
from billing_service.logs import AccessLog, get_logger
from billing_service.settings import Settings

# A caller's request id is kept only if it is short and plain: it ends up in every log line and header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_AUTHENTICATED_PREFIXES = ("/billing",)
_WRITES = frozenset({"POST", "PUT", "PATCH"})
_READS = frozenset({"GET", "HEAD"})
_MAX_IDEMPOTENCY_KEY = 255

log = get_logger("billing_service.edge")


class _Refused(Exception):
    """Raised inside the edge to answer at once with a BillingError's status and body."""

    def __init__(self, error: BillingError, *, body_read: bool = True) -> None:
        self.error = error
        self.body_read = body_read


class Edge:
    def __init__(self, app: FastAPI, settings: Settings, fast_routes: list[FastRoute]) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_body_bytes
        # Off, every request goes through FastAPI: the same answers, slower (for measuring, or as an escape hatch).
        self.lane = FastLane(fast_routes if settings.fast_lane else [])
        self.auth: Authenticator = app.state.authenticator
        self.limiter: RateLimiter = app.state.limiter
        self.scopes = ScopeTable(app)
        self.metrics = app.state.http_metrics = HttpMetrics()
        self.access_log = (
            AccessLog(
                log_format=settings.log_format or ("console" if settings.embedded else "json"),
                sample=settings.access_log_sample,
            )
            if settings.access_log
            else None
        )
        app.state.access_log = self.access_log  # flushed by the lifespan at shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        authorization = request_id = content_length = content_type = idempotency_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = authorization or value
            elif name == b"x-request-id":
                request_id = request_id or value
            elif name == b"content-length":
                content_length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"idempotency-key":
                idempotency_key = idempotency_key or value
            elif name == b"transfer-encoding":
                content_length = content_length or b"chunked"
        if request_id is not None:
            candidate = request_id.decode("latin-1")
            request_id = candidate if _REQUEST_ID.fullmatch(candidate) else None
        client_request_id = request_id is not None
        request_id = request_id or os.urandom(16).hex()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        request_id_header = (b"x-request-id", request_id.encode())
        status = 500
        route = None

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            caller = None
            matched = self.lane.match(method, path) if not scope["query_string"] else None
            if path.startswith(_AUTHENTICATED_PREFIXES):
                caller = await self.auth.authenticate(
                    authorization.decode("latin-1") if authorization else None, request_id
                )
                template = matched[0].template if matched is not None else self.scopes.template(path)
                authorize_scope(caller, required_scope(method, template))
            self._guard(method, path, content_length, content_type)
            if caller is not None and caller.service and method not in _READS:
                try:
                    self.limiter.check_token(caller.name)
                except RateLimited as limited:
                    # Read the (bounded) body first, so the connection stays usable for the client's retry.
                    if content_length not in (None, b"0"):
                        await self._read_body(receive)
                    raise _Refused(limited) from None
            if matched is not None and caller is not None:
                route = matched[0].template
                outcome = await self._fast(receive, send, matched, caller, idempotency_key, request_id_header)
                if isinstance(outcome, int):
                    status = outcome
                    return
                receive = outcome  # handed over to FastAPI, with the body the lane already read
            scope.setdefault("state", {})["caller"] = caller
            await self.app(scope, self._limited(receive), send_with_request_id)
        except (_Refused, BillingError) as refused:
            error = refused.error if isinstance(refused, _Refused) else refused
            # Refused before its body was read: the unread bytes make the connection unusable for a next
            # request, so say it closes (servers then close it, and clients do not reuse it).
            unread = content_length not in (None, b"0") and not (isinstance(refused, _Refused) and refused.body_read)
            status = await self._send_error(send, error, request_id_header, close=unread)
        finally:
            elapsed = time.perf_counter() - started
            route = route or route_template(scope, self.app)
            # Any other method string a client invents would be a new time series: fold them into one.
            method = method if method in METHODS else "OTHER"
            self.metrics.record(method, route, status, elapsed)
            if self.access_log is not None:
                self.access_log.write(
                    request_id=request_id,
                    method=method,
                    path=path,
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    client_request_id=client_request_id,
                )
            # Not cleared: the server logs an unhandled exception after this returns, and that line should
            # carry the request id too. Each request runs in its own task, so nothing leaks.

    def _guard(self, method: str, path: str, content_length: bytes | None, content_type: bytes | None) -> None:
        if content_length is not None and (not content_length.isdigit() or int(content_length) > self.max_body):
            raise PayloadTooLarge(f"Bodies are limited to {self.max_body} bytes.")
        if content_type is not None and method in _WRITES:
            media_type = content_type.split(b";")[0].strip().lower()
            if media_type != b"application/json" and not media_type.endswith(b"+json"):
                # The console's HTML forms (checked after the JSON test: no cost to an API write).
                if media_type == b"application/x-www-form-urlencoded" and path.startswith("/console/"):
                    return
                raise BillingError(
                    "Send the body as JSON (Content-Type: application/json).",
                    code="unsupported_media_type",
                    status_code=415,
                )

    def _limited(self, receive: Receive) -> Receive:
        """`receive` for FastAPI, refusing a chunked body as soon as it passes the limit."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # FastAPI turns any other exception raised while it reads the body into a 400; an
                    # HTTPException passes through to the handler, which answers 413 payload_too_large.
                    raise StarletteHTTPException(413, f"Bodies are limited to {self.max_body} bytes.")
            return message

        return limited_receive

    async def _fast(
        self,
        receive: Receive,
        send: Send,
        matched: tuple[FastRoute, Any],
        caller: Caller,
        idempotency_key: bytes | None,
        request_id_header: tuple[bytes, bytes],
    ) -> int | Receive:
        """Serve a hot route and return the status it answered; or return the `receive` FastAPI should
        read the request from, when the lane hands it over."""
        route, path_id = matched
        if route.access == "service":
            authorize_service(caller)
        else:
            authorize_reader(caller, path_id)
        key = None
        if idempotency_key is not None:
            key = idempotency_key.decode("latin-1")
            if not 0 < len(key) <= _MAX_IDEMPOTENCY_KEY:
                return receive  # FastAPI's header validation answers the 422
        body = None
        if route.body is not None:
            raw = await self._read_body(receive)
            body = route.parse(raw)
            if body is None:
                # Validation failed: FastAPI reads the same bytes again and answers its documented 422.
                return _replay(raw, receive)
        try:
            answer = await route.call(self.app.state, path_id, body, key, caller)
        except Exception as exc:
            error = as_billing_error(exc)
            if error is None:
                log.exception("unhandled error", route=route.template)
                error = BillingError("Internal error.", code="internal_error", status_code=500)
            raise _Refused(error) from exc
        await _send_answer(send, answer.status, answer.body, [*answer.raw_headers(), request_id_header])
        return answer.status

    async def _send_error(
        self, send: Send, error: BillingError, request_id_header: tuple[bytes, bytes], *, close: bool = False
    ) -> int:
        body = codec.error_body(error.detail, error.code)
        headers = [codec.JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode()), request_id_header]
        if close:
            headers.append((b"connection", b"close"))
        headers += [(name.lower().encode(), value.encode()) for name, value in (error.headers() or {}).items()]
        await _send_answer(send, error.status_code, body, headers)
        return error.status_code

    async def _read_body(self, receive: Receive) -> bytes:
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise _Refused(
                    BillingError("The client disconnected.", code="client_disconnected", status_code=499),
                    body_read=False,
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _Refused(PayloadTooLarge(f"Bodies are limited to {self.max_body} bytes."), body_read=False)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _send_answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then defers to the server's."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
