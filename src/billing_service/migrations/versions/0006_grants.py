"""Grants: every credit is a grant with a priority, a category and maybe an expiry; debits draw them down in order.

Where a grant's unspent tokens live: in its account's row, as `accounts.grants`, an array of slots
(grant id, remaining, priority, expires_at, created_at) kept in draw order (priority, then the earliest
expiry, no expiry last, then the oldest). Keeping them beside the balance they make up is what lets a
charge stay ONE conditional UPDATE of one row: the draw-down reads and writes the same row the overdraft
guard locks, so EvalPlanQual re-checks both together and no second snapshot is ever needed.

Accounting, kept by every statement and proved by `billing audit`:
- sum(slots.remaining) = balance - held: what holds reserve was drawn from grants into the hold tree's
  allocation (`hold_funding`), and goes back to the same grants when the tree closes;
- every ledger row says which grants it drew from or paid into (`funding`, amounts unsigned, the row's
  sign applies), so a grant's remaining = its credit - what rows drew + what refunds returned - expiry,
  minus what hold trees still hold of it;
- `next_expiry` is the soonest expiry among slots that hold tokens. A write refuses to run while it is
  due (the refusal path sweeps and retries), so a debit never spends an expired token and every ledger
  row's balance_after is exact; reads subtract what is due but not yet swept.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.execute("""
    CREATE TYPE billing_grant_slot AS (
        grant_id uuid, remaining bigint, priority smallint, expires_at timestamptz, created_at timestamptz
    );

    -- Tokens of the slots that are live at t.
    CREATE FUNCTION billing_live(slots billing_grant_slot[], t timestamptz) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT coalesce(sum(s.remaining), 0)::bigint FROM unnest(slots) s
        WHERE s.expires_at IS NULL OR s.expires_at > t
    $$;

    CREATE FUNCTION billing_next_expiry(slots billing_grant_slot[]) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT min(s.expires_at) FROM unnest(slots) s WHERE s.remaining > 0
    $$;

    -- Inserts a slot in draw order, after every slot whose key sorts before or equal to it.
    CREATE FUNCTION billing_slot_insert(slots billing_grant_slot[], slot billing_grant_slot)
    RETURNS billing_grant_slot[] LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        i int := 1;
        n int := coalesce(cardinality(slots), 0);
    BEGIN
        WHILE i <= n AND ((slots[i]).priority, coalesce((slots[i]).expires_at, 'infinity'), (slots[i]).created_at,
                          (slots[i]).grant_id)
                      <= (slot.priority, coalesce(slot.expires_at, 'infinity'), slot.created_at, slot.grant_id) LOOP
            i := i + 1;
        END LOOP;
        RETURN slots[1:i - 1] || slot || slots[i:n];
    END $$;

    -- Inserts several slots, each at its place in the draw order.
    CREATE FUNCTION billing_slots_add(slots billing_grant_slot[], added billing_grant_slot[])
    RETURNS billing_grant_slot[] LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        slot billing_grant_slot;
    BEGIN
        FOREACH slot IN ARRAY coalesce(added, '{}') LOOP
            slots := billing_slot_insert(slots, slot);
        END LOOP;
        RETURN slots;
    END $$;

    -- The draw-down: takes `amount` from the live slots in order. Called in the SET of the UPDATE that holds
    -- the account row, so `slots` is the locked row's. drawn_at is the instant of the decision (the ledger row
    -- is stamped with it); emptied slots leave the array. The caller's guard has checked that the slots cover
    -- the amount; a slot that expired in the microseconds since raises BG001, and the caller retries.
    CREATE FUNCTION billing_draw(
        slots billing_grant_slot[], amount bigint,
        OUT new_slots billing_grant_slot[], OUT funding jsonb, OUT next_expiry timestamptz, OUT drawn_at timestamptz
    ) LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        s billing_grant_slot;
        left_to_draw bigint := amount;
        take bigint;
    BEGIN
        drawn_at := clock_timestamp();
        new_slots := '{}';
        funding := '[]';
        FOREACH s IN ARRAY slots LOOP
            IF left_to_draw > 0 AND s.remaining > 0 AND (s.expires_at IS NULL OR s.expires_at > drawn_at) THEN
                take := least(left_to_draw, s.remaining);
                left_to_draw := left_to_draw - take;
                s.remaining := s.remaining - take;
                funding := funding || jsonb_build_object('grant_id', s.grant_id, 'amount', take);
            END IF;
            IF s.remaining > 0 THEN
                new_slots := new_slots || s;
                IF s.expires_at IS NOT NULL AND (next_expiry IS NULL OR s.expires_at < next_expiry) THEN
                    next_expiry := s.expires_at;
                END IF;
            END IF;
        END LOOP;
        IF left_to_draw > 0 THEN
            RAISE EXCEPTION 'live grants do not cover a draw of %', amount USING ERRCODE = 'BG001';
        END IF;
    END $$;

    -- Gives tokens back to the grants they came from (a hold tree closing, a refund into a live grant). A grant
    -- whose slot has left the array gets it back, at its place in the order; if it has expired or was voided
    -- since, the slot is already due and the next sweep writes the tokens off. VOLATILE: it reads the grant
    -- with a fresh snapshot, taken while its caller holds the account row.
    CREATE FUNCTION billing_return(
        slots billing_grant_slot[], owner uuid, funding jsonb,
        OUT new_slots billing_grant_slot[], OUT next_expiry timestamptz
    ) LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        entry jsonb;
        returned_grant uuid;
        returned bigint;
        i int;
        s billing_grant_slot;
        g record;
        placed boolean;
    BEGIN
        new_slots := slots;
        FOR entry IN SELECT value FROM jsonb_array_elements(coalesce(funding, '[]')) LOOP
            returned_grant := (entry ->> 'grant_id')::uuid;
            returned := (entry ->> 'amount')::bigint;
            CONTINUE WHEN returned <= 0;
            placed := false;
            FOR i IN 1 .. coalesce(cardinality(new_slots), 0) LOOP
                IF (new_slots[i]).grant_id = returned_grant THEN
                    s := new_slots[i];
                    s.remaining := s.remaining + returned;
                    new_slots[i] := s;
                    placed := true;
                    EXIT;
                END IF;
            END LOOP;
            IF NOT placed THEN
                SELECT priority, least(expires_at, voided_at) AS expires_at, created_at INTO STRICT g
                FROM grants WHERE user_id = owner AND id = returned_grant;
                new_slots := billing_slot_insert(new_slots,
                    ROW(returned_grant, returned, g.priority, g.expires_at, g.created_at)::billing_grant_slot);
            END IF;
        END LOOP;
        next_expiry := billing_next_expiry(new_slots);
    END $$;

    ALTER TABLE accounts
        ADD COLUMN grants billing_grant_slot[] NOT NULL DEFAULT '{}',
        ADD COLUMN next_expiry timestamptz,
        -- Scratch: the funding of the row's latest draw, so the same statement's ledger row can record it
        -- (an UPDATE's RETURNING sees only new values).
        ADD COLUMN last_draw jsonb;
    -- The sweeper's queue. Changes only when the soonest expiry does, so most charges stay HOT updates.
    CREATE INDEX accounts_next_expiry ON accounts (next_expiry) WHERE next_expiry IS NOT NULL;

    CREATE TABLE grants (
        user_id uuid NOT NULL REFERENCES accounts (user_id),
        id uuid NOT NULL DEFAULT billing_uuidv7(),
        amount bigint NOT NULL CHECK (amount > 0),
        priority smallint NOT NULL CHECK (priority BETWEEN 0 AND 100),
        category text NOT NULL CHECK (category IN ('paid', 'promotional')),
        expires_at timestamptz,
        -- credit: POST credit-tokens; refund: a refund whose grant had expired; allowance: a period's grant;
        -- opening: the balance an account had when grants arrived (migration 0006).
        source text NOT NULL CHECK (source IN ('credit', 'refund', 'allowance', 'opening')),
        voided_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (user_id, id)
    );
    CREATE INDEX grants_id ON grants (id);

    -- What each hold tree reserved from each grant; reserved tokens stay the tree's until captured or returned.
    CREATE TABLE hold_funding (
        user_id uuid NOT NULL,
        root_id uuid NOT NULL,
        grant_id uuid NOT NULL,
        amount bigint NOT NULL CHECK (amount >= 0),
        PRIMARY KEY (user_id, root_id, grant_id),
        FOREIGN KEY (user_id, root_id) REFERENCES holds (user_id, id),
        FOREIGN KEY (user_id, grant_id) REFERENCES grants (user_id, id)
    );

    ALTER TABLE transactions
        ADD COLUMN funding jsonb,
        ADD COLUMN grant_id uuid,
        ADD COLUMN refund_of uuid,
        DROP CONSTRAINT transactions_type_check,
        ADD CONSTRAINT transactions_type_check
            CHECK (type IN ('debit', 'credit', 'capture', 'expiry', 'void', 'refund')),
        DROP CONSTRAINT transactions_sign_matches_type,
        ADD CONSTRAINT transactions_sign_matches_type
            CHECK ((type IN ('debit', 'capture', 'expiry', 'void')) = (amount < 0)),
        ADD CONSTRAINT transactions_refund_names_its_charge CHECK ((type = 'refund') = (refund_of IS NOT NULL));
    CREATE INDEX transactions_user_refund_of ON transactions (user_id, refund_of) WHERE refund_of IS NOT NULL;

    -- What accounts already held becomes one opening grant each: paid, priority 50, no expiry.
    INSERT INTO grants (user_id, amount, priority, category, source)
    SELECT user_id, balance, 50, 'paid', 'opening' FROM accounts WHERE balance > 0;
    UPDATE accounts a
    SET grants = ARRAY[ROW(g.id, a.balance - a.held, g.priority, NULL, g.created_at)::billing_grant_slot]
    FROM grants g
    WHERE g.user_id = a.user_id AND g.source = 'opening' AND a.balance > a.held;
    INSERT INTO hold_funding (user_id, root_id, grant_id, amount)
    SELECT h.user_id, h.root_id, g.id, sum(h.remaining)
    FROM holds h JOIN grants g ON g.user_id = h.user_id AND g.source = 'opening'
    WHERE h.status = 'active'
    GROUP BY h.user_id, h.root_id, g.id;
    """)


def downgrade() -> None:
    op.execute("""
    DROP INDEX transactions_user_refund_of;
    ALTER TABLE transactions
        DROP CONSTRAINT transactions_refund_names_its_charge,
        DROP CONSTRAINT transactions_sign_matches_type,
        DROP CONSTRAINT transactions_type_check;
    -- Expiry, void and refund rows stay in the ledger as plain debits and credits: balances still equal it.
    UPDATE transactions SET type = 'debit' WHERE type IN ('expiry', 'void');
    UPDATE transactions SET type = 'credit' WHERE type = 'refund';
    ALTER TABLE transactions
        ADD CONSTRAINT transactions_type_check CHECK (type IN ('debit', 'credit', 'capture')),
        ADD CONSTRAINT transactions_sign_matches_type CHECK ((type IN ('debit', 'capture')) = (amount < 0)),
        DROP COLUMN refund_of,
        DROP COLUMN grant_id,
        DROP COLUMN funding;
    DROP TABLE hold_funding;
    DROP TABLE grants;
    ALTER TABLE accounts DROP COLUMN last_draw, DROP COLUMN next_expiry, DROP COLUMN grants;
    DROP FUNCTION billing_return(billing_grant_slot[], uuid, jsonb);
    DROP FUNCTION billing_draw(billing_grant_slot[], bigint);
    DROP FUNCTION billing_slots_add(billing_grant_slot[], billing_grant_slot[]);
    DROP FUNCTION billing_slot_insert(billing_grant_slot[], billing_grant_slot);
    DROP FUNCTION billing_next_expiry(billing_grant_slot[]);
    DROP FUNCTION billing_live(billing_grant_slot[], timestamptz);
    DROP TYPE billing_grant_slot;
    """)
