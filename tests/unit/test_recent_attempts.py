"""`RecentAttempts`: open attempts remembered after a move, bounded, terminal ones forgotten."""

from __future__ import annotations

from typing import Any, cast

import asyncpg

from gateway.context import RecentAttempts


def row(order_no: str, status: str = "accepted") -> asyncpg.Record:
    fields: dict[str, Any] = {"id": 1, "order_no": order_no, "status": status, "amount": 100}
    return cast(asyncpg.Record, fields)


def test_a_moved_attempt_is_remembered_as_it_is_after_the_move() -> None:
    recent = RecentAttempts()
    recent.moved(row("O-1"), "sent")
    got = recent.get("O-1")
    assert got is not None
    assert (got["status"], got["amount"]) == ("sent", 100)
    assert recent.get("O-2") is None


def test_a_terminal_attempt_is_forgotten() -> None:
    recent = RecentAttempts()
    recent.moved(row("O-1"), "processing")
    recent.moved(row("O-1", "processing"), "succeeded")
    assert recent.get("O-1") is None
    recent.moved(row("O-2"), "failed")
    assert recent.get("O-2") is None


def test_the_oldest_goes_first_when_full() -> None:
    recent = RecentAttempts(size=2)
    recent.moved(row("O-1"), "sent")
    recent.moved(row("O-2"), "sent")
    recent.moved(row("O-1", "sent"), "processing")  # moved again: now the newest
    recent.moved(row("O-3"), "sent")
    assert recent.get("O-2") is None
    assert recent.get("O-1") is not None
    assert recent.get("O-3") is not None
