"""Graceful shutdown: SIGTERM lets every request already in flight finish and be answered, then exits cleanly.

The charges are held in flight deterministically: the test locks the account row, so every charge (or the
batch carrying it) waits on that lock inside PostgreSQL when the server is told to stop.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from conftest import SERVICE_TOKEN, fund, ledger_state, start_server, stop_server

IN_FLIGHT = 6


def test_sigterm_answers_every_request_in_flight_then_exits_cleanly(database_url: str, db: Any) -> None:
    live = start_server(database_url, workers=2)
    try:
        user_id = uuid.uuid4()
        with live.client() as http:
            fund(http, user_id, 100)
        answers: list[httpx.Response | Exception] = []

        def charge(n: int) -> None:
            try:
                with httpx.Client(base_url=live.base_url, timeout=30) as http:
                    answers.append(
                        http.post(
                            "/billing/charge-tokens",
                            json={"user_id": str(user_id), "amount": 1, "description": f"in flight {n}"},
                            headers={"Authorization": f"Bearer {SERVICE_TOKEN}", "Idempotency-Key": f"sd-{n}"},
                        )
                    )
            except Exception as exc:  # noqa: BLE001 - recorded, and the assertion below names it
                answers.append(exc)

        threads = [threading.Thread(target=charge, args=(n,)) for n in range(IN_FLIGHT)]
        with psycopg.connect(database_url, autocommit=True) as locker:
            with locker.transaction():
                locker.execute("SELECT 1 FROM accounts WHERE user_id = %s FOR UPDATE", (user_id,))
                for thread in threads:
                    thread.start()
                _wait_until_waiting_on_a_lock(locker)
                live.process.send_signal(signal.SIGTERM)
                time.sleep(1.0)  # the server is draining: the charges are still blocked on our lock
                assert live.process.poll() is None, "the server exited with requests in flight"
            # The lock is released here: the blocked charges commit and must be answered.
        for thread in threads:
            thread.join(timeout=30)
        assert live.process.wait(timeout=30) == 0
    finally:
        stop_server(live.process)

    statuses = [answer.status_code if isinstance(answer, httpx.Response) else repr(answer) for answer in answers]
    assert statuses == [200] * IN_FLIGHT, statuses
    assert ledger_state(db, user_id) == (100 - IN_FLIGHT, 100 - IN_FLIGHT, 1 + IN_FLIGHT)


def _wait_until_waiting_on_a_lock(conn: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
        if row and row[0] > 0:
            time.sleep(0.5)  # let the other charges reach the server too
            return
        time.sleep(0.05)
    pytest.fail("no charge ever waited on the account's row lock")
