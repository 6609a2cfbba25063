"""Masking of personal data (脱敏) for logs and API output. Pure functions, no state.

Field maskers keep just enough to recognise a value in a conversation with a bank or a
borrower and nothing that identifies a person:

    mask_account      6222020200112233445  -> 622202*********3445   (first 6, last 4)
    mask_name         欧阳娜娜             -> ***娜                   (last character)
    mask_id_number    11010119900307123X   -> 110***********123X    (first 3, last 4)
    mask_phone        13812345678          -> 138****5678           (first 3, last 4)

Every masked value has the length of the original, and separators (spaces, hyphens) stay
where they were. A value too short to keep its head and tail while still hiding at least
`_MIN_HIDDEN` characters loses its head first, then its tail.

`mask_text` finds such numbers inside free text (log messages, exception texts, bank error
strings). It looks for whole runs bounded by anything but an ASCII letter or digit, so
identifiers such as `LC202611250001` are left alone while `卡号6222020200112233445` is not:

    - 18-character resident ID numbers: 17 digits and a digit or X;
    - mainland mobile numbers `1[3-9]` + 9 digits, optionally written `+86`/`0086`/`86`
      first or grouped 3-4-4;
    - bank account numbers: runs of 12 to 19 digits, or the same written in groups of four.

Shorter numbers — amounts in fen up to 11 digits, dates like `20261125` or `2026-11-25` —
are never touched. The price of catching every account number is that a 12-digit or longer
number that is not one (a compact `yyyymmddHHMMSS` timestamp, a sum in fen above
99,999,999,999) is masked too; personal data leaking is the worse mistake. Names cannot be
recognised in free text: log them as fields (`payee_name=...`), never inside a message.
"""

from __future__ import annotations

import re

# A masked value must hide at least this many characters, or it keeps less of its ends.
_MIN_HIDDEN = 2
_STAR = "*"

# Weights and check characters of GB 11643 (ISO 7064 MOD 11-2), the resident ID checksum.
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

# A number is a whole run: not glued to an ASCII letter or digit on either side (CJK text,
# punctuation and spaces are boundaries). Alternatives are tried in order at each position.
_PII_RE = re.compile(
    r"(?<![0-9A-Za-z])"
    r"(?:"
    r"(?P<id>\d{17}[\dXx])"
    r"|(?P<phone_prefix>(?:\+|00)?86[ -]?)?(?P<phone>1[3-9]\d(?:[ -]?\d{4}){2})"
    r"|(?P<account>\d{12,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?)"
    r")"
    r"(?![0-9A-Za-z])"
)


def _mask_keep(value: str, head: int, tail: int) -> str:
    """Star every letter or digit of `value` except the first `head` and last `tail` of them."""
    positions = [i for i, c in enumerate(value) if c.isalnum()]
    n = len(positions)
    if n < head + tail + _MIN_HIDDEN:
        head = 0
    if n < tail + _MIN_HIDDEN:
        tail = 0
    hidden = set(positions[head : n - tail])
    return "".join(_STAR if i in hidden else c for i, c in enumerate(value))


def mask_account(value: str) -> str:
    """A bank account or card number: first 6 and last 4 digits kept, the rest starred.

    `6222020200112233445` → `622202*********3445`. Numbers under 12 digits keep only their
    last 4 (and numbers under 6 digits nothing).
    """
    return _mask_keep(value, 6, 4)


def mask_name(value: str) -> str:
    """A person's name: only the last character kept (`张三` → `*三`, `欧阳娜娜` → `***娜`)."""
    if len(value) <= 1:
        return _STAR * len(value)
    return _STAR * (len(value) - 1) + value[-1]


def mask_id_number(value: str) -> str:
    """A resident ID number: first 3 and last 4 characters kept (`110***********123X`)."""
    return _mask_keep(value, 3, 4)


def mask_phone(value: str) -> str:
    """A phone number: first 3 and last 4 digits kept (`13812345678` → `138****5678`)."""
    return _mask_keep(value, 3, 4)


def _is_resident_id(digits: str) -> bool:
    """An 18-character run is an ID number when it ends in X or its check digit is right."""
    if digits[-1] in "Xx":
        return True
    total = sum(int(d) * w for d, w in zip(digits[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == digits[-1]


def _mask_match(m: re.Match[str]) -> str:
    if (found := m.group("id")) is not None:
        # an 18-digit run is either; one that fails the ID checksum is an account number
        return mask_id_number(found) if _is_resident_id(found) else mask_account(found)
    if (found := m.group("phone")) is not None:
        return (m.group("phone_prefix") or "") + mask_phone(found)
    return mask_account(m.group("account"))


def mask_text(text: str) -> str:
    """`text` with every account number, ID number and mobile number in it masked."""
    return _PII_RE.sub(_mask_match, text)
