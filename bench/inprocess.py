"""The Python layer alone: an ASGI app driven in-process, its own CPU per request, without a server or wrk.

    uv run python bench/inprocess.py --app service|reference --workload balance|charge|capture [--requests N] [--stub]

Run by `./scripts/bench --in-process` (which seeds the database and runs each app in a fresh interpreter); its
output is one JSON line. 16 tasks call the app's ASGI callable directly with real scopes, bodies and headers,
against the real database (DATABASE_URL), after a warm-up. What it reports is this process's CPU time per
request (time.process_time: the app, psycopg and libpq, the event loop; not PostgreSQL's), which on a shared
2-core machine moves by a few percent where req/s under wrk moves by 20.

--stub replaces the database work of a balance read (the service's `ledger.balance_with_holds`, with its read
batcher off, the reference's `driver.one`) or of a capture (the service's `holds.capture`, with its capture
batcher off, the reference's `driver.capture`, both still hashing the request) by a constant answer that still
suspends once on the event loop: what is left is the edge, routing, validation, the answer and the access line,
i.e. what each app costs besides the driver.

capture: each task captures from a root hold of its own (made here, on the seeded accounts 1001...), as one
streaming agent run does, so the figure is the Python path's and not the tree lock's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKEN = "bench-service-token"  # noqa: S105 - the bench's throwaway token
TASKS = 16


def user_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


# A hold as the HOLD statement returns it, for the stubbed captures.
_NOW = datetime.now(UTC)
HOLD_ROW = (uuid.uuid4(), uuid.uuid4(), None, uuid.uuid4(), 1, 10**9, 10**9, 0, "active", _NOW, "bench", None, _NOW)


def build_app(name: str, stub: bool) -> Any:
    os.environ.update(
        {
            "BILLING_SERVICE_TOKENS": TOKEN,
            "BILLING_LOG_FORMAT": "json",
            "REF_TOKEN": TOKEN,
            # As in the wrk bench: the limiter on, its limits above what is sent.
            "BILLING_RATE_LIMIT_TOKEN_RATE": "1000000",
            "BILLING_RATE_LIMIT_TOKEN_BURST": "2000000",
            "BILLING_RATE_LIMIT_USER_RATE": "1000000",
            "BILLING_RATE_LIMIT_USER_BURST": "2000000",
        }
    )
    if name == "service":
        if stub:  # the stubs replace the single read and capture; batched, neither would reach them
            os.environ["BILLING_BATCH_READS"] = "false"
            os.environ["BILLING_BATCH_CAPTURES"] = "false"
        from billing_service.app import create_app
        from billing_service.ledger import routes, rules

        app = create_app()
        if stub:
            answer = rules.Balance(uuid.uuid4(), 10, 0, 10, 0, None)

            async def balance_with_holds(pool: Any, *, user_id: uuid.UUID) -> Any:
                await _one_loop_turn()
                return answer

            routes.ledger.balance_with_holds = balance_with_holds  # type: ignore[assignment]

            from billing_service.holds import routes as holds_routes
            from billing_service.holds import rules as holds

            hold = holds.Hold(*HOLD_ROW)

            async def capture(pool: Any, **request: Any) -> Any:
                # What the real one does besides its transaction: the request's hash, then the answer.
                fields = ("hold_id", "amount", "description", "metadata", "final", "allow_overrun")
                holds.request_hash("capture", **{name: request.get(name) for name in fields})
                await _one_loop_turn()
                return holds.Capture(uuid.uuid4(), 10, hold)

            holds_routes.holds.capture = capture  # type: ignore[assignment]
        return app
    sys.path.insert(0, str(HERE))
    import reference_app

    if stub:
        row = (0, 10, 0, None)

        async def one(self: Any, statement: str, params: dict[str, Any]) -> Any:
            await _one_loop_turn()
            return row

        async def captured(self: Any, hold_id: uuid.UUID, params: dict[str, Any]) -> Any:
            await _one_loop_turn()
            return ("applied", uuid.uuid4(), 10, None, None), HOLD_ROW

        reference_app.PsycopgDriver.one = one  # type: ignore[method-assign]
        reference_app.PsycopgDriver.capture = captured  # type: ignore[method-assign]
    return reference_app.app


async def _one_loop_turn() -> None:
    """Suspend on a future the loop resolves, as a database wait would."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_soon(future.set_result, None)
    await future


CAPTURE_BODY = json.dumps(
    {"amount": 1, "metadata": {"run_id": "bench-run", "model": "bench-model", "input_tokens": 10, "output_tokens": 2}}
).encode()


def create_holds(url: str) -> list[str]:
    """One root hold per task, on the seeded accounts 1001... (the bench's own helper)."""
    sys.path.insert(0, str(HERE))
    from bench import create_holds_on

    return create_holds_on(url, range(1001, 1001 + TASKS), "in-process bench", ttl_seconds=3600)


def request(workload: str, hold_id: str | None) -> tuple[dict[str, Any], bytes]:
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {TOKEN}".encode())]
    if workload == "balance":
        return {
            "method": "GET",
            "path": f"/billing/balance/{user_id(random.randint(1, 1000))}",
            "headers": headers,
        }, b""
    if workload == "capture":
        path, body = f"/billing/holds/{hold_id}/capture", CAPTURE_BODY
    else:
        path = "/billing/charge-tokens"
        body = json.dumps({"user_id": user_id(random.randint(1, 1000)), "amount": 1, "description": "bench"}).encode()
    headers += [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"idempotency-key", f"inprocess-{uuid.uuid4().hex}".encode()),
    ]
    return {"method": "POST", "path": path, "headers": headers}, body


async def call(app: Any, workload: str, statuses: list[int], hold_id: str | None = None) -> None:
    scope, body = request(workload, hold_id)
    scope.update(
        type="http",
        http_version="1.1",
        scheme="http",
        root_path="",
        query_string=b"",
        raw_path=scope["path"].encode(),
        client=("127.0.0.1", 1),
        server=("127.0.0.1", 2),
        asgi={"version": "3.0"},
    )
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)


async def measure(app: Any, workload: str, requests: int) -> dict[str, Any]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    statuses: list[int] = []
    hold_ids: list[str | None] = (
        list(create_holds(os.environ["DATABASE_URL"])) if workload == "capture" else [None] * TASKS
    )

    async def worker(count: int, hold_id: str | None) -> None:
        for _ in range(count):
            await call(app, workload, statuses, hold_id)

    await asyncio.gather(*(worker(max(requests // TASKS // 10, 50), hold) for hold in hold_ids))  # warm up
    statuses.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(requests // TASKS, hold) for hold in hold_ids))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = len(statuses)
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await lifespan
    return {
        "requests": done,
        "non_200": sum(status != 200 for status in statuses),
        "cpu_us_per_request": round(cpu / done * 1e6, 1),
        "wall_us_per_request": round(wall / done * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=("service", "reference"), required=True)
    parser.add_argument("--workload", choices=("balance", "charge", "capture"), required=True)
    parser.add_argument("--requests", type=int, default=16_000)
    parser.add_argument("--stub", action="store_true", help="balance and capture: no database call (see above)")
    args = parser.parse_args()
    if args.stub and args.workload == "charge":
        parser.error("--stub is for the balance and capture workloads")
    # The apps' log lines (the service's access line per request) go where a server's would, not to the terminal.
    log = os.open(os.environ.get("INPROCESS_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    app = build_app(args.app, args.stub)
    import uvloop

    result = uvloop.run(measure(app, args.workload, args.requests))
    print(json.dumps({"app": args.app, "workload": args.workload, "stub": args.stub, **result}), flush=True)


if __name__ == "__main__":
    main()
