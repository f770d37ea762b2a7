"""The loop under both batchers (coalescing.Coalescer): what arrives during a batch goes in the next one, and a
batch that fails in an unforeseen way answers its requests with the error instead of leaving them waiting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from billing_service.coalescing import Coalescer, WriteCoalescer, resolve


@dataclass
class _Item:
    value: int
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _Doubler(Coalescer[_Item]):
    """Answers each item with twice its value; fails the batch that holds a 13, without resolving anything."""

    def __init__(self) -> None:
        super().__init__(max_size=4, max_inflight=1)
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def ask(self, value: int) -> int:
        item = _Item(value)
        self._enqueue(item)
        result: int = await item.future
        return result

    async def _settle(self, batch: list[_Item]) -> None:
        self.batches.append([item.value for item in batch])
        await self.release.wait()
        if any(item.value == 13 for item in batch):
            raise RuntimeError("unlucky batch")
        for item in batch:
            item.future.set_result(item.value * 2)


def test_what_arrives_during_a_batch_waits_for_the_next_one_and_batches_are_bounded() -> None:
    async def run() -> tuple[list[int], list[list[int]]]:
        doubler = _Doubler()
        first = asyncio.create_task(doubler.ask(1))
        await asyncio.sleep(0.01)  # the first batch is under way, holding only item 1
        later = [asyncio.create_task(doubler.ask(n)) for n in range(2, 8)]
        await asyncio.sleep(0.01)
        doubler.release.set()
        answers = await asyncio.gather(first, *later)
        await doubler.close()
        return answers, doubler.batches

    answers, batches = asyncio.run(run())
    assert answers == [2, 4, 6, 8, 10, 12, 14]
    assert batches == [[1], [2, 3, 4, 5], [6, 7]]


def test_a_batch_that_raises_answers_its_requests_with_the_error_and_the_next_batch_still_runs() -> None:
    async def run() -> tuple[BaseException | None, int]:
        doubler = _Doubler()
        doubler.release.set()
        failed = asyncio.create_task(doubler.ask(13))
        with pytest.raises(RuntimeError, match="unlucky batch"):
            await asyncio.wait_for(failed, 5)
        answer = await asyncio.wait_for(doubler.ask(21), 5)
        await doubler.close()
        return failed.exception(), answer

    error, answer = asyncio.run(run())
    assert isinstance(error, RuntimeError)
    assert answer == 42


@dataclass
class _Write:
    value: int
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    fallback: bool = False
    committed: bool = False


class _Ledger(WriteCoalescer[_Write]):
    """Writes even values in its batch, hands odd ones to the single path; a batch holding 13 fails after its
    commit, as a bug in building the answers would."""

    def __init__(self) -> None:
        super().__init__(max_size=8, max_inflight=1)
        self.written: list[int] = []

    async def ask(self, value: int) -> Any:
        item = _Write(value)
        self._enqueue(item)
        return await item.future

    async def _apply(self, batch: list[_Write]) -> None:
        for item in batch:
            if item.value % 2:
                item.fallback = True
            else:
                self.written.append(item.value)
                item.committed = True
        if any(item.value == 13 for item in batch):
            raise RuntimeError("after the commit")
        for item in batch:
            if item.committed:
                resolve(item, ("batch", item.value))

    async def _single(self, item: _Write) -> Any:
        self.written.append(item.value)
        return ("single", item.value)


def test_a_write_batch_that_fails_after_its_commit_never_writes_its_committed_items_again() -> None:
    async def run() -> tuple[list[Any], list[int]]:
        ledger = _Ledger()
        answers = await asyncio.gather(*(ledger.ask(n) for n in (2, 13, 4, 7)), return_exceptions=True)
        await ledger.close()
        return answers, ledger.written

    answers, written = asyncio.run(run())
    # The committed ones answer 500 (their client retries with its key and gets the replay); the others are
    # decided by the single path, once each.
    assert [getattr(answer, "code", answer) for answer in answers] == [
        "internal_error",
        ("single", 13),
        "internal_error",
        ("single", 7),
    ]
    assert sorted(written) == [2, 4, 7, 13]
