"""Logs of a real `billing serve`: structured, one request id through every line of a request, no secrets."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    NEXT_SERVICE_TOKEN,
    SERVICE_TOKEN,
    LiveServer,
    start_server,
    stop_server,
    user_jwt,
)


@pytest.fixture(scope="module")
def logged(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    """A server of its own, its stdout and stderr captured to a file, JSON format (the non-embedded default)."""
    log_path = tmp_path_factory.mktemp("logs") / "serve.log"
    with log_path.open("wb") as output:
        live = start_server(database_url, workers=2, output=output, BILLING_LOG_FORMAT="json")
        try:
            yield live, log_path
        finally:
            stop_server(live.process)


def log_lines(log_path: Path, expect: str, timeout: float = 10) -> list[str]:
    """The captured lines, once `expect` appears in them (workers flush on their own schedule)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        if expect in text or time.monotonic() > deadline:
            return text.splitlines()
        time.sleep(0.1)


def json_records(lines: list[str]) -> list[dict[str, Any]]:
    # The banner `billing serve` prints for a human is the only non-JSON output.
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_a_request_id_is_echoed_and_bound_to_the_requests_log_lines(logged: tuple[LiveServer, Path]) -> None:
    live, log_path = logged
    user = uuid.uuid4()
    with live.client() as http:
        response = http.get(f"/billing/balance/{user}", headers={"X-Request-ID": "orchestrator-run-42.step-3"})
    assert response.headers["X-Request-ID"] == "orchestrator-run-42.step-3"

    records = json_records(log_lines(log_path, "orchestrator-run-42.step-3"))
    mine = [record for record in records if record.get("request_id") == "orchestrator-run-42.step-3"]
    assert len(mine) == 1
    assert mine[0] | {"timestamp": None} == {
        "event": "request",
        "method": "GET",
        "path": f"/billing/balance/{user}",
        "route": "/billing/balance/{user_id}",
        "status": 404,
        "duration_ms": mine[0]["duration_ms"],
        "request_id": "orchestrator-run-42.step-3",
        "level": "info",
        "logger": "billing_service.access",
        "timestamp": None,
    }


def test_a_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(logged: tuple[LiveServer, Path]) -> None:
    live, log_path = logged
    with live.client() as http:
        generated = http.get("/healthz").headers["X-Request-ID"]
        replaced = http.get("/healthz", headers={"X-Request-ID": "x" * 129}).headers["X-Request-ID"]
        spaced = http.get("/healthz", headers={"X-Request-ID": "two words"}).headers["X-Request-ID"]
    for request_id in (generated, replaced, spaced):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    records = json_records(log_lines(log_path, spaced))
    assert {generated, replaced, spaced} <= {record.get("request_id") for record in records}


def test_every_line_is_structured_and_the_servers_lines_go_through_structlog(logged: tuple[LiveServer, Path]) -> None:
    _, log_path = logged
    lines = log_lines(log_path, "Started worker-2")
    assert [line for line in lines if not line.startswith(("{", "billing_service on "))] == []
    records = json_records(lines)
    assert any(r["logger"].startswith("_granian") and r["event"] == "Started worker-2" for r in records)
    assert all({"event", "level", "timestamp", "logger"} <= record.keys() for record in records)


def test_tokens_and_jwts_never_reach_the_logs(logged: tuple[LiveServer, Path]) -> None:
    live, log_path = logged
    user = uuid.uuid4()
    jwt = user_jwt(user)
    wrong = f"wrong-token-{uuid.uuid4().hex}"
    with httpx.Client(base_url=live.base_url, timeout=30) as http:
        for token in (SERVICE_TOKEN, NEXT_SERVICE_TOKEN, jwt, wrong):
            http.get(f"/billing/balance/{user}", headers={"Authorization": f"Bearer {token}"})
            http.post(
                "/billing/charge-tokens",
                headers={"Authorization": f"Bearer {token}"},
                json={"user_id": str(user), "amount": 1, "description": "x"},
            )
        # Credentials where they do not belong: in the query string, and as the request id.
        http.get(f"/billing/balance/{user}?access_token={jwt}", headers={"Authorization": f"Bearer {jwt}"})
        echoed = http.get("/healthz", headers={"X-Request-ID": SERVICE_TOKEN})
        marker = http.get("/healthz", headers={"X-Request-ID": "after-the-tokens"})
    assert echoed.status_code == marker.status_code == 200

    text = "\n".join(log_lines(log_path, "after-the-tokens"))
    assert f"/billing/balance/{user}" in text  # the requests were logged...
    for secret in (SERVICE_TOKEN, NEXT_SERVICE_TOKEN, jwt, jwt.split(".")[2], wrong):
        assert secret not in text  # ...their credentials were not
    assert "[REDACTED]" in text  # the service token sent as a request id was scrubbed


def test_console_format_is_for_humans_and_still_carries_the_request_id(database_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as output:
        live = start_server(database_url, workers=1, output=output, BILLING_LOG_FORMAT="console")
        try:
            httpx.get(f"{live.base_url}/healthz", headers={"X-Request-ID": "console-check"})
            lines = log_lines(log_path, "console-check")
        finally:
            stop_server(live.process)
    line = next(line for line in lines if "console-check" in line)
    assert not line.startswith("{")
    assert "request_id=console-check" in line
    assert "status=200" in line


def test_access_lines_are_written_in_batches_and_a_5xx_line_at_once() -> None:
    """The edge records a line per request; AccessLog writes them a batch per system call, at once for a 5xx."""
    import asyncio
    import os

    from billing_service.logs import AccessLog

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def written() -> list[dict[str, Any]]:
        try:
            data = os.read(read_end, 1 << 20)
        except BlockingIOError:
            return []
        return [json.loads(line) for line in data.decode().splitlines()]

    def line(log: AccessLog, status: int, n: int) -> None:
        log.write(request_id=f"r{n}", method="GET", path=f"/p/{n}", route="/p", status=status, duration_ms=1.0)

    async def run() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        log = AccessLog(log_format="json", fd=write_end)
        line(log, 200, 1)
        line(log, 404, 2)
        before_timer = written()
        await asyncio.sleep(log.FLUSH_SECONDS * 3)
        after_timer = written()
        line(log, 200, 3)
        line(log, 503, 4)  # with the line waiting before it
        at_once = written()
        for n in range(log.FLUSH_LINES):
            line(log, 200, 100 + n)
        full_batch = written()
        log.flush()
        return before_timer, after_timer, at_once, full_batch

    try:
        before_timer, after_timer, at_once, full_batch = asyncio.run(run())
    finally:
        os.close(read_end)
        os.close(write_end)
    assert before_timer == []
    assert [(r["path"], r["status"]) for r in after_timer] == [("/p/1", 200), ("/p/2", 404)]
    assert [(r["path"], r["status"]) for r in at_once] == [("/p/3", 200), ("/p/4", 503)]
    assert len(full_batch) == AccessLog.FLUSH_LINES
    assert after_timer[0]["event"] == "request" and after_timer[0]["request_id"] == "r1"
