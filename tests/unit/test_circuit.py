"""The per-funder circuit breaker: opens on consecutive failures, probes once, closes on success."""

from __future__ import annotations

from gateway.circuit import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> Breaker:
    return Breaker("bank-a", threshold=3, cooldown=30, clock=clock)


def test_opens_after_threshold_consecutive_failures_and_refuses_calls() -> None:
    c = Clock()
    b = breaker(c)
    for _ in range(2):
        assert b.allow()
        b.record("not_sent")
    assert b.state == "closed"
    assert b.allow()
    b.record("unknown")
    assert b.state == "open"
    assert not b.allow()
    assert 29 <= b.retry_in() <= 30


def test_a_success_or_a_refusal_resets_the_count() -> None:
    c = Clock()
    b = breaker(c)
    b.record("not_sent")
    b.record("not_sent")
    b.record("rejected")  # the bank answered: it is up
    b.record("not_sent")
    b.record("not_sent")
    assert b.state == "closed"


def test_after_cooldown_exactly_one_probe_goes_out() -> None:
    c = Clock()
    b = breaker(c)
    for _ in range(3):
        b.record("not_sent")
    c.now += 31
    assert b.allow()
    assert b.state == "half_open"
    assert not b.allow()  # a second call waits for the probe's answer


def test_failed_probe_reopens_successful_probe_closes() -> None:
    c = Clock()
    b = breaker(c)
    for _ in range(3):
        b.record("not_sent")
    c.now += 31
    assert b.allow()
    b.record("unknown")
    assert b.state == "open"
    assert not b.allow()
    c.now += 31
    assert b.allow()
    b.record("ok")
    assert b.state == "closed"
    assert b.allow()
    assert b.allow()


def test_transitions_are_flagged_for_publication() -> None:
    c = Clock()
    b = breaker(c)
    b.record("not_sent")
    assert not b.changed
    b.record("not_sent")
    b.record("not_sent")
    assert b.changed
    assert b.open_until() is not None
