"""The double-entry journal: where every fen of a disbursement is at any moment.

    accepted    transit:<f> +amount   funder:<f> −funder share   custody:prefund:<f> −platform share
    succeeded   payout:borrowers +amount                         transit:<f> −amount
    failed      the acceptance reversed (transit back to the funder and the custody account)
    top-up      custody:prefund:<f> +x                           external:custody −x

Every posting balances to zero, is append-only (a trigger refuses updates and deletes) and
leaves a voucher. The platform's own operating money has no account here: transaction money
(the funders' and the prefund in custody) is all the journal holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import asyncpg

from gateway.store import queries as q

PAYOUTS = "payout:borrowers"
EXTERNAL_CUSTODY = "external:custody"
ACCEPTED = "disbursement.accepted"  # the posting intake writes (also in SQL: fg_intake)


def funder_account(funder_id: str) -> str:
    return f"funder:{funder_id}"


def custody_account(funder_id: str) -> str:
    return f"custody:prefund:{funder_id}"


def transit_account(funder_id: str) -> str:
    return f"transit:{funder_id}"


class Unbalanced(ValueError):
    pass


def lines_of(kind: str, entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The entries of one transaction, zero amounts dropped; they must balance to zero."""
    lines = [(a, n) for a, n in entries if n != 0]
    if sum(n for _, n in lines) != 0:
        raise Unbalanced(f"{kind}: entries sum to {sum(n for _, n in lines)}, not 0")
    return lines


def voucher_event(
    tx_id: int, kind: str, lines: list[tuple[str, int]], txn_no: str | None,
    reference: str | None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "tx": tx_id,
        "kind": kind,
        "txn_no": txn_no,
        "reference": reference,
        "entries": [{"account": a, "amount": n} for a, n in lines],
    }


async def post(
    conn: q.Conn,
    kind: str,
    entries: list[tuple[str, int]],
    *,
    day: date,
    txn_no: str | None = None,
    reference: str | None = None,
    funder_id: str | None = None,
) -> int:
    """Append one balanced transaction (zero amounts are dropped) and its voucher."""
    lines = lines_of(kind, entries)
    tx_id = int(
        await conn.fetchval(
            "INSERT INTO ledger_transactions (kind, txn_no, reference, funder_id)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            kind,
            txn_no,
            reference,
            funder_id,
        )
    )
    await conn.execute(
        "INSERT INTO ledger_entries (tx_id, account, amount, business_day)"
        " SELECT $1, a, n, $4 FROM unnest($2::text[], $3::bigint[]) AS u(a, n)",
        tx_id,
        [a for a, _ in lines],
        [n for _, n in lines],
        day,
    )
    await q.voucher(
        conn, f"ledger.{kind}", voucher_event(tx_id, kind, lines, txn_no, reference), txn_no
    )
    return tx_id


def acceptance(funder_id: str, funder_share: int, platform_share: int) -> list[tuple[str, int]]:
    """Accepted: the money leaves the funder (and the prefund in custody) for transit."""
    return [
        (transit_account(funder_id), funder_share + platform_share),
        (funder_account(funder_id), -funder_share),
        (custody_account(funder_id), -platform_share),
    ]


async def reserve(
    conn: q.Conn, txn_no: str, funder_id: str, funder_share: int, platform_share: int, day: date
) -> None:
    await post(
        conn,
        ACCEPTED,
        acceptance(funder_id, funder_share, platform_share),
        day=day,
        txn_no=txn_no,
        funder_id=funder_id,
    )


RELEASED = "disbursement.released"
PAID = "disbursement.paid"


def release_entries(
    funder_id: str, funder_share: int, platform_share: int
) -> list[tuple[str, int]]:
    """Failed: the acceptance reversed, transit back to the funder and the custody account."""
    return [
        (transit_account(funder_id), -(funder_share + platform_share)),
        (funder_account(funder_id), funder_share),
        (custody_account(funder_id), platform_share),
    ]


def settle_entries(funder_id: str, amount: int) -> list[tuple[str, int]]:
    """Succeeded: the money left transit for the borrower."""
    return [(transit_account(funder_id), -amount), (PAYOUTS, amount)]


async def release(
    conn: q.Conn, txn_no: str, funder_id: str, funder_share: int, platform_share: int, day: date
) -> None:
    await post(
        conn,
        RELEASED,
        release_entries(funder_id, funder_share, platform_share),
        day=day,
        txn_no=txn_no,
        funder_id=funder_id,
    )


async def settle(conn: q.Conn, txn_no: str, funder_id: str, amount: int, day: date) -> None:
    await post(
        conn, PAID, settle_entries(funder_id, amount), day=day, txn_no=txn_no, funder_id=funder_id
    )


async def custody_move(
    conn: q.Conn, funder_id: str, amount: int, day: date, *, kind: str, reference: str
) -> None:
    """Money entering (amount > 0) or leaving the platform's custody account at a funder."""
    await post(
        conn,
        kind,
        [(custody_account(funder_id), amount), (EXTERNAL_CUSTODY, -amount)],
        day=day,
        reference=reference,
        funder_id=funder_id,
    )


async def balances(conn: q.Conn) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT account, sum(amount)::bigint AS balance FROM ledger_entries"
        " GROUP BY account ORDER BY account"
    )
    return {r["account"]: r["balance"] for r in rows}


async def entries(
    conn: q.Conn, account: str, *, before_id: int | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT e.id, e.amount, e.business_day, e.created_at, t.id AS tx_id, t.kind, t.txn_no,
               t.reference
          FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id
         WHERE e.account = $1 AND ($2::bigint IS NULL OR e.id < $2)
         ORDER BY e.id DESC LIMIT $3
        """,
        account,
        before_id,
        limit,
    )


@dataclass
class LedgerCheck:
    transactions: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def _unbalanced(conn: q.Conn) -> AsyncIterator[asyncpg.Record]:
    last = 0
    while True:
        rows = await conn.fetch(
            "SELECT tx_id, sum(amount)::bigint AS total FROM ledger_entries"
            " WHERE tx_id > $1 AND tx_id <= $1 + 50000 GROUP BY tx_id HAVING sum(amount) <> 0",
            last,
        )
        for r in rows:
            yield r
        top = await conn.fetchval("SELECT max(id) FROM ledger_transactions")
        last += 50000
        if top is None or last >= top:
            return


async def verify(conn: q.Conn) -> LedgerCheck:
    """Every transaction balances, and the journal agrees with the operational tables: the
    custody accounts with the prefund, transit with the open disbursements, payouts with the
    succeeded ones, and each funder's account with its shares of both.

    All of it is read from one snapshot: on a live gateway, a posting committed between two
    of the reads (a prefund withdrawal between the journal's balances and the prefund table)
    would otherwise show a disagreement that is not there, or hide one that is."""
    if conn.is_in_transaction():  # the caller's transaction decides what it sees
        return await _verify(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify(conn)


async def _verify(conn: q.Conn) -> LedgerCheck:
    out = LedgerCheck()
    out.transactions = int(await conn.fetchval("SELECT count(*) FROM ledger_transactions"))
    async for r in _unbalanced(conn):
        out.problems.append(f"transaction {r['tx_id']} does not balance (sum {r['total']})")
    bal = await balances(conn)
    prefund = {
        r["funder_id"]: r["balance"]
        for r in await conn.fetch("SELECT funder_id, balance FROM prefund ORDER BY funder_id")
    }
    out.problems += _per_funder(  # custody without a prefund row must be empty
        bal, custody_account, prefund,
        lambda fid, held, want: f"prefund of {fid}: table {want}, ledger {held or 0}",
    )  # fmt: skip
    open_by = await _sum_by_funder(conn, "amount", "status NOT IN ('succeeded', 'failed')")
    out.problems += _per_funder(
        bal, transit_account, open_by,
        lambda fid, held, want: f"{transit_account(fid)}: "
        + ("missing" if held is None else f"{held} in transit")
        + f", open disbursements {want}",
    )  # fmt: skip
    paid = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM disbursements WHERE status = 'succeeded'"
    )
    if bal.get(PAYOUTS, 0) != paid:
        out.problems.append(f"{PAYOUTS}: {bal.get(PAYOUTS, 0)}, succeeded disbursements {paid}")
    # a funder's money is out for every disbursement it funds, open or paid: its share
    funded = await _sum_by_funder(conn, "alloc_funder", "status <> 'failed'")
    out.problems += _per_funder(
        bal, funder_account, {fid: -total for fid, total in funded.items()},
        lambda fid, held, want: f"{funder_account(fid)}: {held or 0}, funder shares of its"
        f" open and succeeded disbursements {-want}",
    )  # fmt: skip
    return out


async def _sum_by_funder(conn: q.Conn, column: str, where: str) -> dict[str, int]:
    """`sum(column)` of the disbursements matching `where` (a constant of this module), by
    funder."""
    rows = await conn.fetch(
        f"SELECT funder_id, sum({column})::bigint AS total FROM disbursements"
        f" WHERE {where} GROUP BY funder_id"
    )
    return {r["funder_id"]: r["total"] for r in rows}


def _per_funder(
    bal: dict[str, int],
    account: Callable[[str], str],
    expected: dict[str, int],
    problem: Callable[[str, int | None, int], str],
) -> list[str]:
    """Each funder's `account` against what the tables say it must hold, for every funder
    with such an account in the journal or an expectation (0 when none): `problem(funder,
    the journal's balance or None, the expected one)` for each that differs."""
    prefix = account("")
    funders = {a.removeprefix(prefix) for a in bal if a.startswith(prefix)} | set(expected)
    return [
        problem(fid, bal.get(account(fid)), expected.get(fid, 0))
        for fid in sorted(funders)
        if bal.get(account(fid), 0) != expected.get(fid, 0)
    ]


def entry_out(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "tx": r["tx_id"],
        "kind": r["kind"],
        "amount": r["amount"],
        "txn_no": r["txn_no"],
        "reference": r["reference"],
        "business_day": r["business_day"].isoformat(),
        "at": r["created_at"].isoformat().replace("+00:00", "Z"),
    }
