"""Masking of account numbers, names, ID numbers and phone numbers, alone and in free text."""

from __future__ import annotations

import pytest

from gateway.masking import mask_account, mask_id_number, mask_name, mask_phone, mask_text

ACCOUNT = "6222020200112233445"
ID_NUMBER = "110101199003071233"  # a valid check digit
ID_NUMBER_X = "11010519491231002X"
PHONE = "13812345678"


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        (ACCOUNT, "622202*********3445"),
        ("6222020200112233", "622202******2233"),
        ("622202020011", "622202**0011"),  # 12 digits: still first 6 and last 4
        ("62220202001", "*******2001"),  # shorter: only the last 4
        ("123456", "**3456"),
        ("12345", "*****"),  # too short to keep anything
        ("", ""),
        ("6222 0202 0011 2233 445", "6222 02** **** ***3 445"),  # separators stay
    ],
)
def test_mask_account_keeps_first_six_and_last_four(value: str, masked: str) -> None:
    assert mask_account(value) == masked
    assert len(mask_account(value)) == len(value)


@pytest.mark.parametrize(
    ("value", "masked"),
    [("张三", "*三"), ("欧阳娜娜", "***娜"), ("李", "*"), ("", ""), ("Li Lei", "*****i")],
)
def test_mask_name_keeps_only_the_last_character(value: str, masked: str) -> None:
    assert mask_name(value) == masked


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        (ID_NUMBER, "110***********1233"),
        (ID_NUMBER_X, "110***********002X"),
        ("110101900307123", "110********7123"),  # the older 15-digit form
    ],
)
def test_mask_id_number_keeps_first_three_and_last_four(value: str, masked: str) -> None:
    assert mask_id_number(value) == masked


@pytest.mark.parametrize(
    ("value", "masked"),
    [(PHONE, "138****5678"), ("138-1234-5678", "138-****-5678"), ("62345678", "****5678")],
)
def test_mask_phone_keeps_first_three_and_last_four(value: str, masked: str) -> None:
    assert mask_phone(value) == masked


# free text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"payout to {ACCOUNT} failed", "payout to 622202*********3445 failed"),
        (f"卡号{ACCOUNT}，户名张三", "卡号622202*********3445，户名张三"),
        (f"account={ACCOUNT};", "account=622202*********3445;"),
        ("card 6222 0202 0011 2233 445 ok", "card 6222 02** **** ***3 445 ok"),
        (f"身份证{ID_NUMBER}", "身份证110***********1233"),
        (f"id {ID_NUMBER_X}.", "id 110***********002X."),
        (f"call {PHONE} now", "call 138****5678 now"),
        ("手机13812345678", "手机138****5678"),
        ("+8613812345678", "+86138****5678"),
        ("0086 138 1234 5678", "0086 138 **** 5678"),
    ],
)
def test_mask_text_masks_numbers_inside_text(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_mask_text_tells_an_18_digit_account_from_an_id_by_the_check_digit() -> None:
    not_an_id = "622202020011223344"  # 18 digits, wrong check digit for an ID
    assert mask_text(not_an_id) == mask_account(not_an_id) == "622202********3344"
    assert mask_text(ID_NUMBER) == mask_id_number(ID_NUMBER)


@pytest.mark.parametrize(
    "text",
    [
        "amount 1000000 fen",
        "amount 20000000 within 300000..20000000",
        "daily limit 5000000000 would be exceeded",
        "business day 2026-11-25, 20261125, 2026/11/25 09:30:15",
        "txn LC202611250001 order LC202611250001-2",  # identifiers glued to letters
        "13812345678x",
        "apr 0.1800 term 36 months",
        "",
    ],
)
def test_mask_text_leaves_amounts_dates_and_identifiers_alone(text: str) -> None:
    assert mask_text(text) == text


def test_mask_text_masks_every_occurrence() -> None:
    text = f"{ACCOUNT} -> {ACCOUNT} ({PHONE}, {PHONE})"
    masked = mask_text(text)
    assert ACCOUNT not in masked
    assert PHONE not in masked
    assert masked.count("622202*********3445") == 2
    assert masked.count("138****5678") == 2
