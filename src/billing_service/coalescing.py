"""Coalescing: the requests one worker receives while its previous batch is at the database go in one batch.

The charge and capture batchers (ledger/batcher.py, holds/batcher.py) and the balance-read batcher
(ledger/read_batcher.py) share this loop. A batch is taken from the queue before its statement is sent, so every
request in it arrived before the statement's snapshot: a batch never answers with a state older than its
requests, and a request that arrives while a batch is at the database waits for the next one instead of joining
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from billing_service.errors import DATABASE_DOWN, BillingError

log = logging.getLogger(__name__)


class _Awaited(Protocol):
    """An item a request awaits: the batch resolves its future."""

    @property
    def future(self) -> asyncio.Future[Any]: ...


class _Write(_Awaited, Protocol):
    """A write a batch may hand to the one-at-a-time path instead of deciding it."""

    fallback: bool
    committed: bool  # its row is written: it must never be decided again


Item = TypeVar("Item", bound=_Awaited)
WriteItem = TypeVar("WriteItem", bound=_Write)


@dataclass
class BatchStats:
    """What a batcher has done in this process; exported as metrics (metrics.BatcherSampler)."""

    batches: int = 0
    items: int = 0
    fallbacks: int = 0  # items a batch could not decide, sent down the one-at-a-time path
    sizes: list[int] = field(default_factory=list)  # the newest 1,000 batch sizes


def json_rows(rows: Iterable[dict[str, Any]]) -> str:
    """A batch's rows as one JSON document, for a statement's json_to_recordset: one msgspec call per batch instead
    of an array per column (UUIDs and datetimes as their ISO strings)."""
    return msgspec.json.encode(list(rows)).decode()


def fail(batch: list[Item], exc: BaseException) -> None:
    """Every request of the batch still waiting gets `exc` (one whose request was cancelled is done already)."""
    for item in batch:
        resolve(item, exc)


def resolve(item: _Awaited, outcome: Any) -> None:
    """Answer the item's request with `outcome`, raised if it is an exception (unless it is answered already)."""
    if item.future.done():
        return
    if isinstance(outcome, BaseException):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)


class Coalescer(Generic[Item]):
    """Queues items and hands them to `_settle` in batches of at most `max_size`, with at most `max_inflight`
    batches being settled at once. A subclass settles a batch: it resolves each item's future."""

    def __init__(self, *, max_size: int, max_inflight: int) -> None:
        self._max_size = max_size
        self._queue: list[Item] = []
        self._arrived = asyncio.Event()
        self._runners = [asyncio.create_task(self._run()) for _ in range(max_inflight)]
        self.stats = BatchStats()

    def _enqueue(self, item: Item) -> None:
        self._queue.append(item)
        self._arrived.set()

    async def close(self) -> None:
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            batch, self._queue = self._queue[: self._max_size], self._queue[self._max_size :]
            if not self._queue:
                self._arrived.clear()
            if batch:
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.sizes.append(len(batch))
                del self.stats.sizes[:-1000]
                try:
                    await self._settle(batch)
                except Exception as exc:  # noqa: BLE001 - a bug in a batch must not stop the loop for the next
                    log.exception("a batch failed outside its own error handling")
                    fail(batch, exc)

    async def _settle(self, batch: list[Item]) -> None:
        raise NotImplementedError


class WriteCoalescer(Coalescer[WriteItem]):
    """A batcher of writes. `_apply` decides in one transaction what it can decide exactly, marks those items
    `committed` once its commit returns and answers them, and marks the others `fallback`; each of those is then
    decided alone by `_single`, the write's one-at-a-time path, which answers every case the batch does not. A
    batch that fails as a whole for another reason than the database being down hands all its uncommitted items
    to `_single`: one odd write never fails its neighbours, and no write is ever decided twice."""

    async def _submit(self, item: WriteItem) -> Any:
        """Queue the write and wait for its answer. Shielded: a client that disconnects must not cancel a write
        its batch may already have committed."""
        self._enqueue(item)
        return await asyncio.shield(item.future)

    async def _settle(self, batch: list[WriteItem]) -> None:
        try:
            await self._apply(batch)
        except DATABASE_DOWN as exc:
            fail(batch, exc)
            return
        except Exception:  # noqa: BLE001 - e.g. a unique violation from a key race: decide each one alone
            if any(item.committed for item in batch):
                log.exception("a batch failed after its commit")
            for item in batch:
                if item.committed:
                    # Deciding it again could post it twice. Its client, unanswered, retries with its key: a replay.
                    resolve(item, BillingError("Internal error.", code="internal_error", status_code=500))
                else:
                    item.fallback = True
        fallbacks = [item for item in batch if item.fallback]
        if fallbacks:
            self.stats.fallbacks += len(fallbacks)
            await asyncio.gather(*(self._decide_alone(item) for item in fallbacks))

    async def _decide_alone(self, item: WriteItem) -> None:
        try:
            outcome = await self._single(item)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request, which raises it
            outcome = exc
        resolve(item, outcome)

    async def _apply(self, batch: list[WriteItem]) -> None:
        raise NotImplementedError

    async def _single(self, item: WriteItem) -> Any:
        raise NotImplementedError
