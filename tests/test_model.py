"""A model-based test: random sequences of API calls against a running `billing serve`, each answer checked
against an in-memory model of the ledger.

The state machine credits (each a grant with a random priority and category), charges (with and without an
Idempotency-Key), replays earlier keyed requests (same body: the same answer and `Idempotent-Replayed: true`;
another body: 422 `idempotency_key_reused`), opens accounts, creates, captures (sometimes `final`) and
releases holds, refunds charges, voids grants, and reads balances, grants and histories. The model draws
grants in its own implementation of the order (priority, then age; no grant here expires), so every debit's
`funding`, every hold's reservation and every refund's way back (last drawn first; a voided grant's share
becomes a new grant) is checked against it. A few users with small amounts, so refusals (402) and conflicts
(409) happen often. Holds live an hour, so none expires during a run and the model stays deterministic.

Each example uses fresh user ids, so examples (and the rest of the suite) never see each other's money.

Reproducing a failure: Hypothesis prints the failing steps and a `@reproduce_failure(...)` blob
(`print_blob=True`); paste the blob as a decorator on `run` below, or run with a fixed seed:
`pytest tests/test_model.py --hypothesis-seed=<n>` (the seed is printed with -s and on failure). Setting
`derandomize=True` in SETTINGS makes every run explore the same sequences.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from billing_service.grants import rules as grants_rules
from billing_service.holds import rules as holds_rules
from billing_service.ledger import rules as ledger_rules
from conftest import LiveServer, start_server, stop_server

SETTINGS = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
USERS = 3
AMOUNTS = st.integers(min_value=1, max_value=40)
HOLD_TTL = 3600
OUTCOMES: Counter[str] = Counter()  # what the examples exercised, printed at the end


@dataclass
class ModelHold:
    user: int
    amount: int
    remaining: int
    status: str = "active"
    reserved: dict[str, int] = field(default_factory=dict)  # grant id -> tokens of it the hold still holds


@dataclass
class ModelGrant:
    user: int
    amount: int
    remaining: int
    priority: int
    category: str
    order: int  # creation order: the tie-break after priority (nothing expires here)
    voided: bool = False


@dataclass
class ModelDebit:
    user: int
    amount: int
    funding: list[tuple[str, int]]
    refunded: int = 0


@dataclass
class Keyed:
    """A keyed request that was acknowledged, and its answer."""

    path: str
    body: dict[str, Any]
    status: int
    answer: dict[str, Any]


@dataclass
class Model:
    users: list[str]
    opened: set[int] = field(default_factory=set)
    balance: dict[int, int] = field(default_factory=dict)
    holds: dict[str, ModelHold] = field(default_factory=dict)
    rows: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)  # (type, amount, balance_after)
    fundings: dict[int, list[list[tuple[str, int]] | None]] = field(default_factory=dict)  # per row, when known
    grants: dict[str, ModelGrant] = field(default_factory=dict)
    debits: dict[str, ModelDebit] = field(default_factory=dict)  # by transaction id

    def live_grants(self, user: int) -> list[tuple[str, ModelGrant]]:
        found = [(gid, g) for gid, g in self.grants.items() if g.user == user and not g.voided and g.remaining]
        return sorted(found, key=lambda item: (item[1].priority, item[1].order))

    def draw(self, user: int, amount: int) -> list[tuple[str, int]]:
        """The draw-down, as the service must do it: lowest priority first, then the oldest."""
        funding = []
        for grant_id, grant in self.live_grants(user):
            take = min(amount, grant.remaining)
            grant.remaining -= take
            amount -= take
            funding.append((grant_id, take))
            if not amount:
                break
        assert not amount, "the model's grants do not cover a debit its balance allowed"
        return funding

    def reserved(self, grant_id: str) -> int:
        return sum(h.reserved.get(grant_id, 0) for h in self.holds.values() if h.status == "active")

    def held(self, user: int) -> int:
        return sum(h.remaining for h in self.holds.values() if h.user == user and h.status == "active")

    def available(self, user: int) -> int:
        return self.balance.get(user, 0) - self.held(user)

    def post(self, user: int, kind: str, amount: int, funding: list[tuple[str, int]] | None = None) -> int:
        self.opened.add(user)
        self.balance[user] = self.balance.get(user, 0) + amount
        self.rows.setdefault(user, []).append((kind, amount, self.balance[user]))
        self.fundings.setdefault(user, []).append(funding)
        return self.balance[user]


def make_machine(server: LiveServer, users_seen: list[str] | None = None) -> type[RuleBasedStateMachine]:
    http = server.client()

    class LedgerMachine(RuleBasedStateMachine):
        keyed = Bundle("keyed")
        hold_ids = Bundle("hold_ids")

        def __init__(self) -> None:
            super().__init__()
            self.model = Model(users=[str(uuid.uuid4()) for _ in range(USERS)])
            if users_seen is not None:
                users_seen.extend(self.model.users)

        def call(self, method: str, path: str, body: dict[str, Any] | None = None, key: str | None = None) -> Any:
            headers = {"Idempotency-Key": key} if key else {}
            response: httpx.Response = http.request(method, path, json=body, headers=headers)
            parts = path.split("?")[0].split("/")
            action = parts[2] + (f"/{parts[-1]}" if parts[2] == "holds" and len(parts) > 4 else "")
            OUTCOMES[f"{method} {action} {response.status_code}"] += 1
            assert response.status_code < 500, response.text
            return response

        def expect_error(self, response: httpx.Response, status: int, code: str) -> None:
            assert (response.status_code, response.json().get("code")) == (status, code), response.text

        @initialize(first=st.lists(st.integers(0, 120), min_size=USERS, max_size=USERS))
        def open_with_credit(self, first: list[int]) -> None:
            # Most examples start with money on most accounts (0: that user starts without an account).
            for user, amount in enumerate(first):
                if amount:
                    self.credit(user, amount, with_key=False, priority=None, category=None)

        # -- ledger writes ------------------------------------------------------------------------------------

        @rule(
            target=keyed,
            user=st.integers(0, USERS - 1),
            amount=AMOUNTS,
            with_key=st.booleans(),
            priority=st.sampled_from([None, 0, 10, 50, 50, 100]),
            category=st.sampled_from([None, "paid", "promotional"]),
        )
        def credit(self, user: int, amount: int, with_key: bool, priority: int | None, category: str | None) -> Any:
            body: dict[str, Any] = {"user_id": self.model.users[user], "amount": amount, "description": "model credit"}
            body |= {"priority": priority} if priority is not None else {}
            body |= {"category": category} if category is not None else {}
            key = str(uuid.uuid4()) if with_key else None
            response = self.call("POST", "/billing/credit-tokens", body, key)
            assert response.status_code == 200, response.text
            grant_id = response.json()["grant_id"]
            self.model.grants[grant_id] = ModelGrant(
                user, amount, amount, 50 if priority is None else priority, category or "paid", len(self.model.grants)
            )
            assert response.json()["balance"] == self.model.post(user, "credit", amount, [(grant_id, amount)])
            assert "Idempotent-Replayed" not in response.headers
            return (key, Keyed("/billing/credit-tokens", body, 200, response.json())) if key else multiple()

        @rule(target=keyed, user=st.integers(0, USERS - 1), amount=AMOUNTS, with_key=st.booleans())
        def charge(self, user: int, amount: int, with_key: bool) -> Any:
            body = {"user_id": self.model.users[user], "amount": amount, "description": "model charge"}
            key = str(uuid.uuid4()) if with_key else None
            response = self.call("POST", "/billing/charge-tokens", body, key)
            if user not in self.model.opened:
                self.expect_error(response, 402, "account_not_found")
                return multiple()
            if self.model.available(user) < amount:
                OUTCOMES[
                    "charge refused"
                    + (
                        " (covered by the balance, not by available)"
                        if self.model.balance.get(user, 0) >= amount
                        else ""
                    )
                ] += 1
                self.expect_error(response, 402, "insufficient_balance")
                return multiple()
            OUTCOMES["charge posted"] += 1
            assert response.status_code == 200, response.text
            funding = self.model.draw(user, amount)
            OUTCOMES[f"charge drew {len(funding)} grant(s)"] += 1
            assert response.json()["balance"] == self.model.post(user, "debit", -amount, funding)
            self.model.debits[response.json()["transaction_id"]] = ModelDebit(user, amount, funding)
            return (key, Keyed("/billing/charge-tokens", body, 200, response.json())) if key else multiple()

        @rule(user=st.integers(0, USERS - 1))
        def open_account(self, user: int) -> None:
            response = self.call("POST", "/billing/accounts", {"user_id": self.model.users[user]})
            expected = 200 if user in self.model.opened else 201
            assert response.status_code == expected, response.text
            assert response.json()["balance"] == self.model.balance.get(user, 0)
            self.model.opened.add(user)

        @rule(earlier=keyed)
        def replay(self, earlier: Any) -> None:
            key, sent = earlier
            response = self.call("POST", sent.path, sent.body, key)
            assert response.status_code == sent.status, response.text
            assert response.json() == sent.answer
            assert response.headers.get("Idempotent-Replayed") == "true"

        @rule(earlier=keyed, extra=st.integers(1, 5))
        def reuse_key_with_another_body(self, earlier: Any, extra: int) -> None:
            key, sent = earlier
            response = self.call("POST", sent.path, {**sent.body, "amount": sent.body["amount"] + extra}, key)
            self.expect_error(response, 422, "idempotency_key_reused")

        # -- holds ----------------------------------------------------------------------------------------------

        @rule(target=hold_ids, user=st.integers(0, USERS - 1), amount=AMOUNTS)
        def create_hold(self, user: int, amount: int) -> Any:
            body = {
                "user_id": self.model.users[user],
                "amount": amount,
                "description": "model run",
                "ttl_seconds": HOLD_TTL,
            }
            response = self.call("POST", "/billing/holds", body, str(uuid.uuid4()))
            if user not in self.model.opened:
                self.expect_error(response, 402, "account_not_found")
                return multiple()
            if self.model.available(user) < amount:
                self.expect_error(response, 402, "insufficient_balance")
                return multiple()
            assert response.status_code == 201, response.text
            hold = response.json()
            assert (hold["amount"], hold["remaining"], hold["status"]) == (amount, amount, "active")
            self.model.holds[hold["hold_id"]] = ModelHold(
                user, amount, amount, reserved=dict(self.model.draw(user, amount))
            )
            return hold["hold_id"]

        @rule(hold_id=hold_ids, amount=AMOUNTS, final=st.booleans())
        def capture(self, hold_id: str, amount: int, final: bool) -> None:
            hold = self.model.holds[hold_id]
            body = {"amount": amount, "final": final}
            response = self.call("POST", f"/billing/holds/{hold_id}/capture", body, str(uuid.uuid4()))
            if hold.status != "active":
                self.expect_error(response, 409, "hold_not_active")
                return
            if amount > hold.remaining:
                self.expect_error(response, 409, "capture_exceeds_hold")
                return
            assert response.status_code == 200, response.text
            hold.remaining = 0 if final else hold.remaining - amount
            hold.status = "captured" if final else "active"
            funding = self.take_reserved(hold, amount)
            if final:
                self.give_back(hold)
            answer = response.json()
            assert answer["balance"] == self.model.post(hold.user, "capture", -amount, funding)
            self.model.debits[answer["transaction_id"]] = ModelDebit(hold.user, amount, funding)
            assert (answer["hold"]["remaining"], answer["hold"]["status"]) == (hold.remaining, hold.status)

        @rule(hold_id=hold_ids)
        def release(self, hold_id: str) -> None:
            hold = self.model.holds[hold_id]
            response = self.call("POST", f"/billing/holds/{hold_id}/release", {}, str(uuid.uuid4()))
            if hold.status != "active":
                self.expect_error(response, 409, "hold_not_active")
                return
            assert response.status_code == 200, response.text
            hold.remaining, hold.status = 0, "released"
            self.give_back(hold)
            assert (response.json()["remaining"], response.json()["status"]) == (0, "released")

        def take_reserved(self, hold: ModelHold, amount: int) -> list[tuple[str, int]]:
            """A capture spends the hold's reservation in the grants' draw order."""
            funding = []
            for grant_id in sorted(
                hold.reserved, key=lambda g: (self.model.grants[g].priority, self.model.grants[g].order)
            ):
                take = min(amount, hold.reserved[grant_id])
                if take:
                    hold.reserved[grant_id] -= take
                    amount -= take
                    funding.append((grant_id, take))
            return funding

        def give_back(self, hold: ModelHold) -> None:
            for grant_id, tokens in hold.reserved.items():
                self.model.grants[grant_id].remaining += tokens
            hold.reserved = {}

        # -- grants and refunds --------------------------------------------------------------------------------

        @rule(data=st.data(), amount=st.one_of(st.none(), st.integers(1, 45)))
        def refund(self, data: st.DataObject, amount: int | None) -> None:
            if not self.model.debits:
                return
            transaction_id = data.draw(st.sampled_from(sorted(self.model.debits)))
            debit = self.model.debits[transaction_id]
            body: dict[str, Any] = {"user_id": self.model.users[debit.user], "description": "model refund"}
            body |= {"amount": amount} if amount is not None else {}
            response = self.call("POST", f"/billing/transactions/{transaction_id}/refund", body, str(uuid.uuid4()))
            room = debit.amount - debit.refunded
            given = room if amount is None else amount
            if given == 0 or given > room:
                self.expect_error(response, 409, "refund_exceeds_charge")
                return
            assert response.status_code == 200, response.text
            # Last drawn first, past what earlier refunds took; a voided grant's share becomes a new grant.
            skip, left, back = debit.refunded, given, []
            for grant_id, drawn in reversed(debit.funding):
                share = drawn - min(skip, drawn)
                skip -= drawn - share
                take = min(share, left)
                left -= take
                if take:
                    back.append((grant_id, take))
            debit.refunded += given
            # The row names the live grants that took tokens back, then the new grants (whose ids only it knows).
            history = self.call("GET", f"/billing/transactions/{self.model.users[debit.user]}?limit=1").json()
            posted = [(entry["grant_id"], entry["amount"]) for entry in history[0]["funding"]]
            returned = [(grant_id, take) for grant_id, take in back if not self.model.grants[grant_id].voided]
            for grant_id, take in returned:
                self.model.grants[grant_id].remaining += take
            new = posted[len(returned) :]
            dead = [(grant_id, take) for grant_id, take in back if self.model.grants[grant_id].voided]
            assert [amount for _, amount in new] == [take for _, take in dead]
            for (new_id, take), (grant_id, _) in zip(new, dead, strict=True):
                old = self.model.grants[grant_id]
                self.model.grants[new_id] = ModelGrant(
                    debit.user, take, take, old.priority, old.category, len(self.model.grants)
                )
                OUTCOMES["refund into a new grant (its own was voided)"] += 1
            funding = returned + new
            answer = response.json()
            assert (answer["amount"], answer["refunded_total"]) == (given, debit.refunded)
            assert answer["balance"] == self.model.post(debit.user, "refund", given, funding)

        @rule(data=st.data())
        def void(self, data: st.DataObject) -> None:
            if not self.model.grants:
                return
            grant_id = data.draw(st.sampled_from(sorted(self.model.grants)))
            grant = self.model.grants[grant_id]
            if self.model.reserved(grant_id) and not grant.voided:
                return  # its reserved tokens would be written off by a sweep, whose timing is not the model's
            response = self.call("POST", f"/billing/grants/{grant_id}/void", {})
            assert response.status_code == 200, response.text
            if grant.voided:
                assert (response.json()["voided"], response.headers.get("Idempotent-Replayed")) == (0, "true")
                return
            voided, grant.remaining, grant.voided = grant.remaining, 0, True
            assert response.json()["voided"] == voided
            if voided:
                self.model.post(grant.user, "void", -voided, [(grant_id, voided)])

        @rule(user=st.integers(0, USERS - 1))
        def read_grants(self, user: int) -> None:
            response = self.call("GET", f"/billing/grants/{self.model.users[user]}")
            assert response.status_code == 200, response.text
            expected = [
                (gid, g.remaining, self.model.reserved(gid), g.priority, g.category)
                for gid, g in sorted(self.model.grants.items(), key=lambda item: (item[1].priority, item[1].order))
                if g.user == user and not g.voided and (g.remaining or self.model.reserved(gid))
            ]
            seen = [
                (g["grant_id"], g["remaining"], g["reserved"], g["priority"], g["category"]) for g in response.json()
            ]
            assert seen == expected

        # -- reads ----------------------------------------------------------------------------------------------

        @rule(user=st.integers(0, USERS - 1))
        def read_balance(self, user: int) -> None:
            response = self.call("GET", f"/billing/balance/{self.model.users[user]}")
            if user not in self.model.opened:
                self.expect_error(response, 404, "account_not_found")
                return
            assert response.status_code == 200, response.text
            body = response.json()
            balance, held = self.model.balance.get(user, 0), self.model.held(user)
            assert (body["balance"], body["held"], body["available"]) == (balance, held, balance - held), body

        @rule(user=st.integers(0, USERS - 1), limit=st.sampled_from([None, 1, 3, 1000]))
        def read_history(self, user: int, limit: int | None) -> None:
            path = f"/billing/transactions/{self.model.users[user]}" + (f"?limit={limit}" if limit else "")
            response = self.call("GET", path)
            if user not in self.model.opened:
                self.expect_error(response, 404, "account_not_found")
                return
            assert response.status_code == 200, response.text
            expected = list(reversed(self.model.rows.get(user, [])))[: limit or None]
            seen = [(row["type"], row["amount"], row["balance_after"]) for row in response.json()]
            assert seen == expected
            fundings = list(reversed(self.model.fundings.get(user, [])))[: limit or None]
            drawn = [
                [(entry["grant_id"], entry["amount"]) for entry in row["funding"] or []] for row in response.json()
            ]
            assert drawn == [funding or [] for funding in fundings]

        @invariant()
        def nothing_negative(self) -> None:
            for user in range(USERS):
                assert self.model.balance.get(user, 0) >= 0
                assert self.model.available(user) >= 0

        def teardown(self) -> None:
            # The whole ledger of each user, read once more, must be exactly the model's.
            for user in self.model.opened:
                self.read_balance(user)
                self.read_history(user, None)

    LedgerMachine.TestCase.settings = SETTINGS
    return LedgerMachine


def test_api_matches_the_model(server: LiveServer) -> None:
    OUTCOMES.clear()
    run_state_machine_as_test(make_machine(server), settings=SETTINGS)
    print(f"\nmodel test: {sum(OUTCOMES.values())} checked answers:", dict(sorted(OUTCOMES.items())))


def test_with_the_outbox_off_the_api_still_matches_the_model(database_url: str, db: psycopg.Connection[Any]) -> None:
    """BILLING_EVENTS=false takes the outbox out of every write statement (and the batches): the same machine,
    fewer examples, on such a server; then not one event for its users, and the audits clean for them."""
    live = start_server(
        database_url, workers=2, BILLING_EVENTS="false", BILLING_DISPATCHER="false", BILLING_POOL_MAX_SIZE="4"
    )
    users: list[str] = []
    try:
        run_state_machine_as_test(make_machine(live, users), settings=settings(SETTINGS, max_examples=20))
    finally:
        stop_server(live.process)
    ids = [uuid.UUID(user) for user in users]
    opened = db.execute("SELECT count(*) FROM accounts WHERE user_id = ANY(%s)", (ids,)).fetchone()
    assert opened is not None and opened[0] > 0  # the machine did move money
    assert db.execute("SELECT count(*) FROM events WHERE user_id = ANY(%s)", (ids,)).fetchone() == (0,)
    assert [finding for finding in ledger_rules.audit(db)[1] if finding.user_id in ids] == []
    assert [problem for problem in holds_rules.audit(db) if problem[0] in ids] == []
    assert [problem for problem in grants_rules.audit(db) if problem[0] in ids] == []
