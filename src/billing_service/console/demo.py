"""`billing demo`: a realistic account, so a newcomer's first look at the console is not empty.

Everything is posted through the ledger's, allowances' and holds' rules (credit, charge, create_allowance,
create_hold, carve_child, capture), so the balances, holds and events outbox are exactly what real traffic would
leave. A month of agent runs is then spread over the past 31 days through `ledger.backdate_demo_rows`, a
demo-only path: it touches only this new account's rows, with times that rise with their seq (the invariant
`balance_at` relies on). The plan's month, the open holds and their captures are posted last and keep their
real, current times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from billing_service.allowances import rules as allowances
from billing_service.errors import AccountNotFound, InvalidRequest
from billing_service.holds import rules as holds
from billing_service.ledger import rules as ledger

MODELS = {  # model: (tokens charged per 10 input tokens, per 10 output tokens)
    "claude-sonnet-4": (3, 15),
    "gpt-4.1": (2, 8),
    "llama-3.3-70b": (1, 1),
}
DAYS = 31


@dataclass(frozen=True)
class DemoSummary:
    user_id: UUID
    transactions: int
    runs: int
    open_holds: int
    balance: int
    held: int


async def seed(pool: AsyncConnectionPool, *, user_id: UUID, now: datetime | None = None) -> DemoSummary:
    try:
        await ledger.balance_with_holds(pool, user_id=user_id)
    except AccountNotFound:
        pass
    else:
        raise InvalidRequest("That account already exists: the demo seeds a new one (omit --user-id).")
    rng = random.Random(user_id.int)  # noqa: S311 - demo data, reproducible per user id
    now = now or datetime.now(UTC)
    start = (now - timedelta(days=DAYS)).replace(hour=8, minute=0, second=0, microsecond=0)
    stamps: list[tuple[UUID, datetime]] = []

    async def credit(amount: int, description: str, at: datetime) -> None:
        posted = await ledger.credit(pool, user_id=user_id, amount=amount, description=description)
        stamps.append((posted.transaction_id, at))

    await credit(1_000_000, "Starter plan: first top-up", start)
    await ledger.set_low_balance_threshold(pool, user_id=user_id, threshold=500_000)
    runs = 0
    for day in range(DAYS):
        moment = start + timedelta(days=day, minutes=rng.randint(0, 60))
        if day in (10, 21):
            await credit(1_000_000, "Top-up", moment)
            moment += timedelta(minutes=5)
        # Busier on weekdays.
        for _ in range(rng.randint(1, 3) if (start + timedelta(days=day)).weekday() >= 5 else rng.randint(3, 6)):
            runs += 1
            run_id = f"run-{(start + timedelta(days=day)):%m%d}-{rng.randrange(16**4):04x}"
            model = rng.choices(list(MODELS), weights=(5, 3, 2))[0]
            per_in, per_out = MODELS[model]
            moment += timedelta(minutes=rng.randint(20, 150))
            for step in range(rng.randint(1, 4)):
                input_tokens = rng.randint(2_000, 24_000)
                output_tokens = rng.randint(300, 4_000)
                amount = max(1, (input_tokens * per_in + output_tokens * per_out) // 10)
                posted = await ledger.charge(
                    pool,
                    user_id=user_id,
                    amount=amount,
                    description=f"{model}: step {step + 1}",
                    metadata={
                        "run_id": run_id,
                        "model": model,
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                    },
                )
                stamps.append((posted.transaction_id, moment))
                moment += timedelta(seconds=rng.randint(5, 90))
    await ledger.backdate_demo_rows(pool, user_id=user_id, stamps=stamps)
    # A promotional grant that expires in 10 days: today's runs draw (reserve) it before the paid tokens, and
    # what they leave of it shows as expiring.
    bonus = ledger.GrantTerms(priority=10, category="promotional", expires_at=datetime.now(UTC) + timedelta(days=10))
    await ledger.credit(pool, user_id=user_id, amount=400_000, description="Launch week bonus", terms=bonus)
    # A plan's monthly tokens: this month's period is granted now (one more credit row), the next on the 1st.
    await allowances.create_allowance(
        pool,
        user_id=user_id,
        amount=200_000,
        period="month",
        rollover=True,
        priority=20,
        category="promotional",
        description="Team plan: monthly tokens",
    )
    # Today: an orchestrator's budget with sub-agents (open), and a finished run (captured, closed).
    root, _ = await holds.create_hold(
        pool, user_id=user_id, amount=240_000, description="Orchestrator: nightly report", ttl_seconds=3600
    )
    research, _ = await holds.carve_child(
        pool, parent_id=root.hold_id, amount=90_000, description="Sub-agent: research", ttl_seconds=1800
    )
    await holds.carve_child(
        pool, parent_id=research.hold_id, amount=30_000, description="Tool: web search", ttl_seconds=900
    )
    coder, _ = await holds.carve_child(
        pool, parent_id=root.hold_id, amount=60_000, description="Sub-agent: code", ttl_seconds=1800
    )
    live_run = {"run_id": "run-live-0001", "model": "claude-sonnet-4", "input_tokens": 8_000, "output_tokens": 900}
    await holds.capture(
        pool, hold_id=research.hold_id, amount=12_500, description="research: step 1", metadata=live_run
    )
    await holds.capture(pool, hold_id=coder.hold_id, amount=7_200, description="code: step 1", metadata=live_run)
    done, _ = await holds.create_hold(
        pool, user_id=user_id, amount=50_000, description="Support triage", ttl_seconds=600
    )
    await holds.capture(
        pool,
        hold_id=done.hold_id,
        amount=18_400,
        description="triage: answer",
        metadata={"run_id": "run-live-0002", "model": "gpt-4.1", "input_tokens": 5_200, "output_tokens": 1_100},
        final=True,
    )
    current = await ledger.balance_with_holds(pool, user_id=user_id)
    return DemoSummary(user_id, len(stamps) + 5, runs + 2, 1, current.balance, current.held)
