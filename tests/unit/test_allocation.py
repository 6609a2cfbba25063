"""Co-lending allocation: integer fen, platform share rounded up, parts summing exactly."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from config.models import Funder
from routing import Allocation, allocate
from routing.allocation import allocate_for

THIRTY = Decimal("0.30")
THIRD = Decimal(1) / Decimal(3)


def test_direct_funder_pays_everything() -> None:
    assert allocate(1_000_001, None) == Allocation(funder=1_000_001, platform=0)


@pytest.mark.parametrize(
    ("amount", "share", "platform", "funder"),
    [
        (1_000_000, THIRTY, 300_000, 700_000),
        (1_000_001, THIRTY, 300_001, 700_000),  # 300000.3 rounds up
        (1_000_003, THIRTY, 300_001, 700_002),  # 300000.9 rounds up
        (1_000_010, THIRTY, 300_003, 700_007),  # exact: no rounding
        (1, THIRTY, 1, 0),  # a single fen goes to the platform
        (2, THIRTY, 1, 1),
        (3, THIRTY, 1, 2),  # 0.9
        (4, THIRTY, 2, 2),  # 1.2
        (3, THIRD, 1, 2),  # 0.999…9 (28 digits) rounds up to 1
        (1_000_001, THIRD, 333_334, 666_667),
        (10, Decimal("0.35"), 4, 6),  # 3.5
    ],
)
def test_platform_share_is_ceiling_and_funder_gets_the_rest(
    amount: int, share: Decimal, platform: int, funder: int
) -> None:
    assert allocate(amount, share) == Allocation(funder=funder, platform=platform)


def test_parts_always_sum_to_the_amount_and_platform_never_falls_short() -> None:
    rng = random.Random(20261125)
    shares = [THIRTY, THIRD, Decimal("0.31"), Decimal("0.5"), Decimal("0.999"), Decimal("0.0001")]
    shares += [Decimal(rng.randint(1, 9999)) / Decimal(10_000) for _ in range(20)]
    for _ in range(5_000):
        amount = rng.choice([rng.randint(1, 100), rng.randint(1, 10**8), rng.randint(1, 10**12)])
        share = rng.choice(shares)
        a = allocate(amount, share)
        assert a.total == a.funder + a.platform == amount
        assert a.platform >= 0
        assert a.funder >= 0
        # the platform pays at least its share and less than one fen more
        assert a.platform >= amount * share > a.platform - 1


@pytest.mark.parametrize("amount", [0, -1, -1_000_000])
def test_non_positive_amount_is_refused(amount: int) -> None:
    with pytest.raises(ValueError, match="amount must be positive"):
        allocate(amount, THIRTY)
    with pytest.raises(ValueError, match="amount must be positive"):
        allocate(amount, None)


@pytest.mark.parametrize("share", [Decimal(0), Decimal(1), Decimal("-0.3"), Decimal("1.5")])
def test_share_outside_the_open_unit_interval_is_refused(share: Decimal) -> None:
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        allocate(1_000_000, share)


def _funder(mode: str, share: str | None) -> Funder:
    return Funder.model_validate(
        {
            "id": "f",
            "name": "F",
            "license": "bank",
            "mode": mode,
            "platform_share": share,
            "priority": 1,
            "products": ["p"],
            "single_max": 10**8,
            "daily_limit": 10**9,
        }
    )


def test_allocate_for_uses_the_funders_mode_and_share() -> None:
    assert allocate_for(_funder("direct", None), 1_000_001) == Allocation(1_000_001, 0)
    assert allocate_for(_funder("co_lending", "0.40"), 1_000_001) == Allocation(600_000, 400_001)
