"""A granter process for the race tests: connects, says `ready`, waits for `go` on stdin (so that every
racer starts at the same instant, whatever its start-up took), runs `grant_due_periods` five times at once
and prints how many periods it credited.

Usage: python racer.py DATABASE_URL
"""

from __future__ import annotations

import asyncio
import sys

from billing_service import db
from billing_service.allowances.rules import grant_due_periods
from billing_service.settings import Settings


async def main(url: str) -> int:
    pool = db.create_pool(url, Settings(pool_min_size=8, pool_max_size=8))
    await pool.open(wait=True, timeout=10)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        return sum(await asyncio.gather(*(grant_due_periods(pool) for _ in range(5))))
    finally:
        await pool.close()


if __name__ == "__main__":
    print(asyncio.run(main(sys.argv[1])), flush=True)
