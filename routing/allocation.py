"""Co-lending allocation in integer fen: the platform's share rounds up, the parts sum exactly."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from config.models import Funder


@dataclass(frozen=True, slots=True)
class Allocation:
    funder: int
    platform: int

    @property
    def total(self) -> int:
        return self.funder + self.platform


def allocate(amount: int, share: Decimal | None) -> Allocation:
    """`platform = ceil(amount × share)`, `funder = amount − platform`; direct without share."""
    if amount <= 0:
        raise ValueError("amount must be positive")
    if share is None:
        return Allocation(funder=amount, platform=0)
    if not Decimal(0) < share < Decimal(1):
        raise ValueError("share must be between 0 and 1")
    num, den = share.as_integer_ratio()
    platform = -(-amount * num // den)  # exact ceiling in integers, whatever the share's digits
    return Allocation(funder=amount - platform, platform=platform)


def allocate_for(funder: Funder, amount: int) -> Allocation:
    return allocate(amount, funder.platform_share if funder.mode == "co_lending" else None)
