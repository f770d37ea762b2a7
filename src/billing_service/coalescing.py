"""Coalescing: the requests one worker receives while its previous batch is at the database go in one batch.

The charge batcher (ledger/batcher.py) and the balance-read batcher (ledger/read_batcher.py) share this loop.
A batch is taken from the queue before its statement is sent, so every request in it arrived before the
statement's snapshot: a batch never answers with a state older than its requests, and a request that arrives
while a batch is at the database waits for the next one instead of joining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class _Awaited(Protocol):
    """An item a request awaits: the batch resolves its future."""

    @property
    def future(self) -> asyncio.Future[Any]: ...


Item = TypeVar("Item", bound=_Awaited)


@dataclass
class BatchStats:
    """What a batcher has done in this process; exported as metrics (metrics.BatcherSampler)."""

    batches: int = 0
    items: int = 0
    fallbacks: int = 0  # items a batch could not decide, sent down the one-at-a-time path
    sizes: list[int] = field(default_factory=list)  # the newest 1,000 batch sizes


def fail(batch: list[Item], exc: BaseException) -> None:
    """Every request of the batch still waiting gets `exc` (one whose request was cancelled is done already)."""
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


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
