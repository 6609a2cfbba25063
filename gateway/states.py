"""The disbursement state machine of DESIGN.md: states only move forward.

    accepted → sent → processing → succeeded | failed
                 ╲        ↕
                  → unknown  (a bank call timed out or answered 5xx)

`unknown` and `processing` may trade places (a query tells us the bank is working on it, or
a later call times out again); nothing ever leaves a terminal state.
"""

from __future__ import annotations

from typing import Final, Literal

State = Literal["accepted", "sent", "processing", "unknown", "succeeded", "failed"]

STATES: Final = ("accepted", "sent", "processing", "unknown", "succeeded", "failed")
TERMINAL: Final = frozenset({"succeeded", "failed"})
OPEN: Final = frozenset({"accepted", "sent", "processing", "unknown"})
# states the poller asks the bank about
QUERYABLE: Final = frozenset({"sent", "processing", "unknown"})

_RANK: Final = {
    "accepted": 0,
    "sent": 1,
    "processing": 2,
    "unknown": 2,
    "succeeded": 3,
    "failed": 3,
}


def can_move(current: str, new: str) -> bool:
    """True when `current → new` is a forward step (a no-op is not a move)."""
    if current == new or current in TERMINAL:
        return False
    return _RANK[new] >= _RANK[current]
