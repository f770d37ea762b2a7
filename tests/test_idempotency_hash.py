"""The charge path's fast request hash is byte-identical to the general one: keys stored before an upgrade
still match their retries after it (a mismatch would turn a safe replay into a 422)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_service.idempotency import posting_hash, request_hash

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(
    operation=st.sampled_from(["charge", "credit"]),
    user_id=st.uuids(),
    amount=st.integers(1, 2**53 - 1),
    description=st.text(min_size=1, max_size=50),
    metadata=st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=4),
)
def test_posting_hash_equals_the_general_request_hash(operation, user_id, amount, description, metadata):
    fields = {"user_id": user_id, "amount": amount, "description": description, "metadata": metadata}
    assert posting_hash(operation, **fields) == request_hash(operation, **fields)


def test_a_different_body_hashes_differently():
    fields = {"user_id": "u", "amount": 1, "description": "d", "metadata": None}
    assert posting_hash("charge", **fields) != posting_hash("charge", **{**fields, "amount": 2})
    assert posting_hash("charge", **fields) != posting_hash("credit", **fields)
