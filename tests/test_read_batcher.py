"""The balance-read batcher (BILLING_BATCH_READS): concurrent reads share one statement, and none is stale.

A batch's statement is sent after all its reads arrived, so a read sees every write acknowledged before it was
sent: the same promise as one statement per read. These tests drive a real server hard enough that batches
hold many reads (checked through /metrics), and check that promise and each read's own answer inside a batch.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest

from billing_service import db
from billing_service.ledger.read_batcher import BalanceBatcher
from billing_service.settings import Settings
from conftest import SERVICE_TOKEN, LiveServer, fund, start_server, stop_server


@pytest.fixture(scope="module")
def reading_server(database_url: str) -> Iterator[LiveServer]:
    # One worker: every concurrent read of the test lands in the same batcher.
    live = start_server(database_url, workers=1, BILLING_BATCH_READS="true")
    yield live
    stop_server(live.process)


def _read_batches(server: LiveServer) -> tuple[float, float]:
    """(reads answered by batches, batches) from the server's /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    return value("billing_read_batch_size_sum"), value("billing_read_batch_size_count")


async def _wait_for_metrics(server: LiveServer, reads: float) -> tuple[float, float]:
    """The batcher's tallies reach /metrics once a second."""
    for _ in range(50):
        found = _read_batches(server)
        if found[0] >= reads:
            return found
        await asyncio.sleep(0.1)
    return _read_batches(server)


class _PlainHttp:
    """HTTP/1.1 on one kept-alive socket: a client far cheaper than httpx, so that the server is the busy side
    (its reads queue into batches) and a write's answer is followed by the next request within microseconds."""

    def __init__(self, server: LiveServer) -> None:
        self.port = int(server.base_url.rsplit(":", 1)[1])

    async def __aenter__(self) -> _PlainHttp:
        self.incoming, self.outgoing = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.outgoing.close()

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {SERVICE_TOKEN}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.outgoing.write(head.encode() + b"\r\n" + payload)
        answer = await self.incoming.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", answer)
        assert length is not None, answer
        return int(answer.split(b" ", 2)[1]), json.loads(await self.incoming.readexactly(int(length[1])))


def test_a_read_sent_after_an_acknowledged_charge_sees_it_while_batches_are_busy(reading_server):
    """Writers charge their own account and at once read it; readers keep the batcher full of reads of the same
    accounts. Each read a writer sends after its charge's 200 must show exactly that charge's balance: a read
    that joined a batch already at the database, or any cached answer, would show the balance before it."""
    users = [uuid.uuid4() for _ in range(8)]
    with reading_server.client() as http:
        for user in users:
            fund(http, user, 10_000)
    stale: list[str] = []
    stop = asyncio.Event()

    async def writer(user: uuid.UUID) -> int:
        checked = 0
        async with _PlainHttp(reading_server) as http:
            for n in range(100):
                body = {"user_id": str(user), "amount": 1, "description": f"step {n}"}
                status, charged = await http.request("POST", "/billing/charge-tokens", body)
                assert status == 200, charged
                status, read = await http.request("GET", f"/billing/balance/{user}")
                assert status == 200, read
                if read["balance"] != charged["balance"]:
                    stale.append(f"{user}: charged to {charged['balance']}, then read {read['balance']}")
                checked += 1
        return checked

    async def reader(number: int) -> int:
        reads = 0
        async with _PlainHttp(reading_server) as http:
            while not stop.is_set():
                status, answer = await http.request("GET", f"/billing/balance/{users[(number + reads) % len(users)]}")
                assert status == 200, answer
                reads += 1
        return reads

    async def run() -> tuple[int, int]:
        readers = [asyncio.create_task(reader(number)) for number in range(48)]
        checked = sum(await asyncio.gather(*(writer(user) for user in users)))
        stop.set()
        return checked, sum(await asyncio.gather(*readers))

    before = _read_batches(reading_server)
    checked, reads = asyncio.run(run())
    after = asyncio.run(_wait_for_metrics(reading_server, before[0] + checked + reads))
    assert stale == []
    assert checked == len(users) * 100
    batched_reads, batches = after[0] - before[0], after[1] - before[1]
    # The promise above was tested on batches that really held several reads, not one read each.
    assert batched_reads >= checked + reads
    assert batched_reads / batches > 2, (batched_reads, batches)


def test_each_read_in_a_batch_gets_its_own_account_and_an_unknown_one_gets_404(reading_server):
    balances = {uuid.uuid4(): amount for amount in (5, 17, 230, 4_000)}
    with reading_server.client() as http:
        for user, amount in balances.items():
            fund(http, user, amount)
    unknown = uuid.uuid4()
    asked = [*balances, unknown] * 25  # the same account several times in one batch, too

    async def run() -> list[httpx.Response]:
        async with reading_server.async_client(limits=httpx.Limits(max_connections=125)) as http:
            return await asyncio.gather(*(http.get(f"/billing/balance/{user}") for user in asked))

    for user, response in zip(asked, asyncio.run(run()), strict=True):
        if user == unknown:
            assert response.status_code == 404
            assert response.json() == {"detail": "No account for this user.", "code": "account_not_found"}
        else:
            assert response.status_code == 200, response.text
            assert response.json() == {
                "user_id": str(user),
                "balance": balances[user],
                "held": 0,
                "available": balances[user],
                "expiring": 0,
                "next_expiry": None,
            }


def test_a_read_that_arrives_while_a_batch_is_under_way_waits_for_the_next_batch(database_url, client, user_id):
    """The rule that makes the promise above hold at any timing: a read never joins a batch that left the queue
    before it arrived (whose statement may already have its snapshot), it goes in the next one."""
    fund(client, user_id, 100)

    async def run() -> tuple[int, int, list[int]]:
        pool = db.create_pool(database_url, Settings(database_url=database_url, pool_min_size=1, pool_max_size=1))
        await pool.open(wait=True)
        batcher = BalanceBatcher(pool)
        try:
            async with pool.connection():  # the pool's one connection: the first batch waits for it
                first = asyncio.create_task(batcher.balance_with_holds(user_id=user_id))
                for _ in range(1000):  # until its batch has left the queue (a few loop turns)
                    if batcher.stats.batches:
                        break
                    await asyncio.sleep(0)
                assert batcher.stats.batches == 1
                charged = client.post(
                    "/billing/charge-tokens", json={"user_id": str(user_id), "amount": 30, "description": "between"}
                )
                assert charged.status_code == 200, charged.text
                second = asyncio.create_task(batcher.balance_with_holds(user_id=user_id))
                await asyncio.sleep(0.05)
            before, after = await asyncio.gather(first, second)
            return before.balance, after.balance, batcher.stats.sizes
        finally:
            await batcher.close()
            await pool.close()

    _, after, sizes = asyncio.run(run())
    assert sizes == [1, 1]
    assert after == 70
