"""Reading a voucher event's top-level "txn_no" off its canonical text: whenever the text
answers, the answer is the parse's; what it cannot tell exactly is left to the parse."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.queries import canonical
from gateway.vouchers import _Txn, _txn_no_of_canonical, _txn_no_parsed

KEYS = st.sampled_from(["txn_no", "a", "tx", "txn_no2", "z", 'a"txn_no', "b\\", "{", "}", ","])
TEXT = st.text(alphabet='ab"\\{}[],:é\x01 txn_o', max_size=12)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def _agrees(event: dict[str, Any]) -> str | _Txn | None:
    text = canonical(event)
    read = _txn_no_of_canonical(text)
    if read is not _Txn.UNREAD:
        assert read == _txn_no_parsed(text), text
    return read


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_the_text_reading_never_disagrees_with_the_parse(event: dict[str, Any]) -> None:
    _agrees(event)


def test_the_events_the_gateway_writes_are_read_without_a_parse() -> None:
    accepted = {"allocation": {"funder": 1, "platform": 0}, "amount": 1, "txn_no": "T-1"}
    posting = {"entries": [{"account": "a", "amount": 1}], "kind": "k", "reference": None,
               "tx": 3, "txn_no": None}  # fmt: skip
    assert _agrees(accepted) == "T-1"
    assert _agrees(posting) is None
    assert _agrees({"borrower_id": "B1", "bank_code": "X"}) is _Txn.ABSENT
    assert _agrees({"note": "a {", "txn_no": "贷-1"}) == "贷-1"
    assert _agrees({"a": {"txn_no": "INNER"}, "txn_no": "OUTER"}) == "OUTER"
    assert _agrees({"txn_no": None}) is None


def test_what_the_text_cannot_tell_is_left_to_the_parse() -> None:
    assert _agrees({"a": {"txn_no": "INNER"}}) is _Txn.UNREAD
    assert _agrees({'a"txn_no': "K"}) is _Txn.UNREAD
    assert _agrees({"txn_no": 'Q"1'}) is _Txn.UNREAD
    assert _agrees({"txn_no": 7}) is _Txn.UNREAD
    assert _agrees({"order_no": "X-01", "txn_no": "X", "type": "t"}) is _Txn.UNREAD
    assert _agrees({"a": {"txn_no": "I"}, "b": 1}) is _Txn.UNREAD
