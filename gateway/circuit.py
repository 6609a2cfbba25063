"""Circuit breakers per funder.

Consecutive `NotSent` or `OutcomeUnknown` answers open a funder's circuit for a cool-down:
the dispatcher holds that funder's queued payouts, intake routes new disbursements to the next
eligible funder. After the cool-down one probe call is let through (half-open); its success
closes the circuit, its failure opens it again. A refusal (`Rejected`) is an answer, so it
counts as the bank being up.

Each process counts its own calls; transitions are written to `funder_circuits`, so every
process's intake sees a circuit opened anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]


@dataclass
class Breaker:
    funder_id: str
    threshold: int
    cooldown: float
    clock: Callable[[], float] = time.monotonic
    state: CircuitState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    changed: bool = field(default=False, repr=False)

    def allow(self) -> bool:
        """May a bank call go out now? (At most one probe while half-open.)"""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self._to("half_open")
        if self.probing:
            return False
        self.probing = True
        return True

    def retry_in(self) -> float:
        """Seconds until a call may be allowed again."""
        if self.state == "open":
            return max(0.1, self.cooldown - (self.clock() - self.opened_at))
        return 0.5

    def record(self, outcome: str) -> None:
        """The outcome of a call that `allow()` let through."""
        self.probing = False
        if outcome in ("ok", "rejected"):
            self.failures = 0
            if self.state != "closed":
                self._to("closed")
            return
        self.failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.failures >= self.threshold
        ):
            self.opened_at = self.clock()
            self._to("open")

    def _to(self, state: CircuitState) -> None:
        self.state = state
        self.changed = True

    def open_until(self, now: datetime | None = None) -> datetime | None:
        if self.state != "open":
            return None
        remaining = self.cooldown - (self.clock() - self.opened_at)
        return (now or datetime.now(UTC)) + timedelta(seconds=max(0.0, remaining))
