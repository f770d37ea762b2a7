"""The dispatcher as its own process (`billing dispatch`), killed with SIGKILL mid-delivery while charges go on:
after a restart every event reaches the receiver at least once, and an event id never comes with another body."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict

import psycopg

from conftest import Postgres, fund, start_server, stop_server
from events.conftest import EVENTS_ENV, wait_for
from events.receiver import Receiver


def _dispatch(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "billing_service", "dispatch"],
        env={**env, "BILLING_DISPATCHER": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_kill_9_mid_delivery_loses_nothing_and_never_changes_a_body(postgres: Postgres):
    database = postgres.create_database()
    receiver = Receiver().start()
    # Every fifth request stalls, so deliveries are in flight when the dispatcher dies.
    receiver.plan = [("sleep", 0.3) if n % 5 == 0 else 200 for n in range(100)]
    server = start_server(database, workers=2, BILLING_DISPATCHER="false", **EVENTS_ENV)
    dispatcher = _dispatch(server.env)
    users = [uuid.uuid4() for _ in range(4)]
    stop = threading.Event()
    try:
        with server.client() as http:
            assert http.post("/billing/webhooks", json={"url": receiver.url, "events": ["*"]}).status_code == 201
            for user in users:
                fund(http, user, 10_000)

            def charge_until_stopped() -> None:
                with server.client() as client:
                    n = 0
                    while not stop.is_set() and n < 400:
                        body = {"user_id": str(users[n % len(users)]), "amount": 1, "description": f"c{n}"}
                        assert client.post("/billing/charge-tokens", json=body).status_code == 200
                        n += 1

            charging = threading.Thread(target=charge_until_stopped)
            charging.start()
            wait_for(lambda: len(receiver.requests) >= 20, what="deliveries under way")
            os.killpg(dispatcher.pid, signal.SIGKILL)
            dispatcher.wait()
            time.sleep(0.5)
            dispatcher = _dispatch(server.env)
            time.sleep(1.0)
            stop.set()
            charging.join()

        with psycopg.connect(database, autocommit=True) as conn:
            expected = {
                str(row[0])
                for row in conn.execute("SELECT id FROM events WHERE user_id = ANY(%s)", (users,)).fetchall()
            }
            ledger_rows = conn.execute("SELECT count(*) FROM transactions WHERE user_id = ANY(%s)", (users,)).fetchone()
        assert ledger_rows is not None and len(expected) == ledger_rows[0]  # one transaction.posted per row

        def received() -> dict[str, set[bytes]]:
            bodies: dict[str, set[bytes]] = defaultdict(set)
            with receiver.lock:
                for request in receiver.requests:
                    bodies[request.headers["webhook-id"]].add(request.body)
            return bodies

        wait_for(lambda: expected <= set(received()), timeout=60, what="every event delivered")
        assert all(len(bodies) == 1 for bodies in received().values())
        # Per account, the first arrival of each event follows the account's order.
        first_seen: dict[str, list[int]] = defaultdict(list)
        seen: set[str] = set()
        with receiver.lock:
            for request in receiver.requests:
                event_id = request.headers["webhook-id"]
                if event_id not in seen:
                    seen.add(event_id)
                    data = json.loads(request.body)["data"]
                    first_seen[data["user_id"]].append(data["balance_after"])
        for user in users:
            balances = first_seen[str(user)]
            assert balances[0] == 10_000 and balances == sorted(balances, reverse=True)
    finally:
        stop.set()
        os.killpg(dispatcher.pid, signal.SIGKILL)
        dispatcher.wait()
        stop_server(server.process)
        receiver.stop()
        postgres.drop_database(database)
