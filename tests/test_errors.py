"""Even a failure nobody planned for answers with the documented {detail, code} shape, and moves no money."""

from __future__ import annotations

import uuid

import pytest
from psycopg import sql

from conftest import fund, ledger_state


@pytest.fixture
def refused_description(db):
    """A description the database refuses with a constraint the service knows nothing about: a stand-in bug."""
    marker = f"fault-{uuid.uuid4().hex}"
    constraint = sql.Identifier(f"test_fault_{uuid.uuid4().hex[:12]}")
    db.execute(
        sql.SQL("ALTER TABLE transactions ADD CONSTRAINT {} CHECK (description <> {}) NOT VALID").format(
            constraint, sql.Literal(marker)
        )
    )
    yield marker
    db.execute(sql.SQL("ALTER TABLE transactions DROP CONSTRAINT {}").format(constraint))


@pytest.mark.parametrize("path", ["/billing/charge-tokens", "/billing/credit-tokens"])
def test_an_unexpected_database_error_is_a_500_with_the_error_shape(client, db, user_id, refused_description, path):
    fund(client, user_id, 10)
    response = client.post(path, json={"user_id": str(user_id), "amount": 1, "description": refused_description})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal error.", "code": "internal_error"}
    assert ledger_state(db, user_id) == (10, 10, 1)
