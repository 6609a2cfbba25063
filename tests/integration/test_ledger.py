"""The double-entry ledger: balanced, append-only, in step with disbursements and prefund,
and holding transaction money only (custody kept apart from the platform's own money)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway import ledger
from tests.fakes import NOT_SENT, SUCCEED, reject
from tests.integration.conftest import AMOUNT, AUTH, Harness, StartGateway, eventually

pytestmark = pytest.mark.integration

SHARE_B = (AMOUNT * 3 + 9) // 10  # ceil(amount × 0.30)
OPENING_B = 1_000_000_000  # config/default.toml's prefund for bank-b


async def _balances(h: Harness) -> dict[str, int]:
    async with h.pool.acquire() as conn:
        return await ledger.balances(conn)


async def _verified(h: Harness) -> ledger.LedgerCheck:
    async with h.pool.acquire() as conn:
        return await ledger.verify(conn)


@pytest.mark.asyncio
async def test_journal_follows_every_outcome_and_always_balances(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(SUCCEED, reject(pre_execution=False), reject(pre_execution=True))
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("L-PAID")
    await h.wait_status("L-PAID", "succeeded")
    await h.accepted("L-FAILED")
    await h.wait_status("L-FAILED", "failed")
    await h.accepted("L-REROUTED")  # refused by bank-a before execution, paid by bank-b
    await h.wait_status("L-REROUTED", "succeeded")
    await h.accepted("L-OPEN", funder_hint="bank-b")  # bank-b's script is used up: stays open
    h.banks["bank-b"].script(NOT_SENT, NOT_SENT, NOT_SENT, NOT_SENT, NOT_SENT)

    bal = await _balances(h)
    assert bal[ledger.PAYOUTS] == 2 * AMOUNT
    assert bal[ledger.funder_account("bank-a")] == -AMOUNT
    assert bal[ledger.funder_account("bank-b")] == -2 * (AMOUNT - SHARE_B)
    assert bal[ledger.custody_account("bank-b")] == OPENING_B - 2 * SHARE_B
    assert bal[ledger.transit_account("bank-b")] == AMOUNT
    assert bal.get(ledger.transit_account("bank-a"), 0) == 0
    assert sum(bal.values()) == 0
    check = await _verified(h)
    assert check.ok, check.problems
    assert await h.prefund() == bal[ledger.custody_account("bank-b")]


@pytest.mark.asyncio
async def test_only_transaction_money_has_accounts(start_gateway: StartGateway) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("L-1", funder_hint="bank-b")
    await h.wait_status("L-1", "succeeded")
    kinds = {a.split(":")[0] for a in await _balances(h)}
    # funders' money, custody (存管), transit, payouts and the custody's outside counterpart:
    # no account for the platform's own operating funds exists to be mixed in
    assert kinds <= {"funder", "custody", "transit", "payout", "external"}
    assert not any(a.startswith("platform") for a in await _balances(h))


@pytest.mark.asyncio
async def test_the_ledger_is_append_only(start_gateway: StartGateway) -> None:
    h = await start_gateway()
    async with h.pool.acquire() as conn:
        for sql in (
            "UPDATE ledger_entries SET amount = amount + 1",
            "DELETE FROM ledger_entries",
            "DELETE FROM ledger_transactions",
        ):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(sql)


@pytest.mark.asyncio
async def test_unbalanced_posting_is_refused(start_gateway: StartGateway) -> None:
    h = await start_gateway()
    async with h.pool.acquire() as conn:
        with pytest.raises(ledger.Unbalanced):
            await ledger.post(
                conn, "broken", [("transit:bank-a", 5), ("funder:bank-a", -4)],
                day=h.svc.business_day(),
            )  # fmt: skip


@pytest.mark.asyncio
async def test_verify_names_a_prefund_that_disagrees_with_the_ledger(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    async with h.pool.acquire() as conn:
        await conn.execute("UPDATE prefund SET balance = balance + 1 WHERE funder_id = 'bank-b'")
        check = await ledger.verify(conn)
    assert not check.ok
    assert any("prefund of bank-b" in p for p in check.problems)


@pytest.mark.asyncio
async def test_prefund_topup_and_withdrawal_are_idempotent_and_change_eligibility(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway(funders={"bank-b": {"prefund_balance": SHARE_B - 1}})
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    h.banks["bank-b"].script(SUCCEED)
    status, body = await h.disburse("L-LOW", funder_hint="bank-b")
    assert status == 201
    assert body["funder_id"] == "bank-a"  # bank-b cannot cover the platform share

    async def prefund(reference: str, amount: int) -> tuple[int, dict[str, object]]:
        resp = await h.client.post(
            "/v1/funders/bank-b/prefund", json={"reference": reference, "amount": amount},
            headers=AUTH,
        )  # fmt: skip
        return resp.status, await resp.json()

    first = await asyncio.gather(*(prefund("TOPUP-1", 10 * AMOUNT) for _ in range(5)))
    assert sorted(s for s, _ in first) == [200, 200, 200, 200, 201]
    assert await h.prefund() == SHARE_B - 1 + 10 * AMOUNT
    assert (await prefund("TOPUP-1", 5))[0] == 409  # same reference, other amount
    status, body = await h.disburse("L-OK", funder_hint="bank-b")
    assert (status, body["funder_id"]) == (201, "bank-b")

    status, err = await prefund("WD-TOO-MUCH", -(100 * AMOUNT))
    assert (status, err["error"]["code"]) == (422, "prefund_insufficient")
    status, body = await prefund("WD-1", -AMOUNT)
    assert status == 201
    assert body["balance_after"] == SHARE_B - 1 + 10 * AMOUNT - SHARE_B - AMOUNT
    await eventually(lambda: _none_if_open(h), "both disbursements terminal")
    check = await _verified(h)
    assert check.ok, check.problems


async def _none_if_open(h: Harness) -> bool | None:
    for txn in ("L-LOW", "L-OK"):
        if (await h.get(txn))["status"] not in ("succeeded", "failed"):
            return None
    return True


@pytest.mark.asyncio
async def test_prefund_needs_the_admin_scope_and_a_co_lending_funder(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()
    body = {"reference": "X1", "amount": 100}
    resp = await h.client.post("/v1/funders/bank-a/prefund", json=body, headers=AUTH)
    assert resp.status == 422  # bank-a is direct: it holds no prefund
    resp = await h.client.post("/v1/funders/bank-z/prefund", json=body, headers=AUTH)
    assert resp.status == 404
    resp = await h.client.post("/v1/funders/bank-b/prefund", json=body)
    assert resp.status == 401


@pytest.mark.asyncio
async def test_balances_and_entries_routes(start_gateway: StartGateway) -> None:
    h = await start_gateway()
    await h.register()
    h.banks["bank-b"].script(SUCCEED, SUCCEED, SUCCEED)
    for i in range(3):
        await h.accepted(f"L-E{i}", funder_hint="bank-b")
        await h.wait_status(f"L-E{i}", "succeeded")
    resp = await h.client.get("/v1/ledger/balances", headers=AUTH)
    items = {i["account"]: i["balance"] for i in (await resp.json())["items"]}
    assert items[ledger.PAYOUTS] == 3 * AMOUNT
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await h.client.get(
            f"/v1/ledger/accounts/{ledger.custody_account('bank-b')}/entries",
            params=params, headers=AUTH,
        )  # fmt: skip
        page = await resp.json()
        seen += [e["amount"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([OPENING_B] + [-SHARE_B] * 3)


@pytest.mark.asyncio
async def test_a_person_reversing_a_final_outcome_keeps_limits_and_ledger_true(
    start_gateway: StartGateway,
) -> None:
    from gateway import outcomes
    from gateway.store import queries as q

    h = await start_gateway()
    await h.register()
    h.banks["bank-b"].script(SUCCEED, reject(pre_execution=False))
    await h.accepted("C-PAID", funder_hint="bank-b")
    await h.wait_status("C-PAID", "succeeded")
    await h.accepted("C-FAILED", funder_hint="bank-b")
    await h.wait_status("C-FAILED", "failed")
    prefund = await h.prefund()

    async def reverse(txn: str, to: str) -> None:
        """What a person's bank_is_right resolution does to a final outcome."""
        async with h.pool.acquire() as conn, conn.transaction():
            d = await q.find_by_txn(conn, txn)
            assert d is not None
            attempt = (await q.attempts_of(conn, [d["id"]]))[d["id"]][-1]
            a = await q.lock_attempt(conn, attempt["id"])
            await outcomes.correct_terminal(conn, h.svc, a, to, by="ops", reason="statement")

    await reverse("C-PAID", "failed")  # the bank never paid it after all
    await reverse("C-FAILED", "succeeded")  # the bank paid it after all
    assert (await h.get("C-PAID"))["status"] == "failed"
    assert (await h.get("C-FAILED"))["status"] == "succeeded"
    usage = await h.usage()
    assert usage[q.funder_scope("bank-b")] == AMOUNT
    assert usage[q.PLATFORM_SCOPE] == AMOUNT
    assert await h.prefund() == prefund  # one share returned, one taken
    check = await _verified(h)
    assert check.ok, check.problems
    with pytest.raises(outcomes.CorrectionRefused):
        await reverse("C-PAID", "failed")  # failed already: only a final outcome reverses
    # reversed back, the lending core would be told "succeeded" again: the outcome it has
    # seen for that txn_no, which it takes for a duplicate (it dedups by txn_no + status)
    with pytest.raises(outcomes.CorrectionRefused, match="reversed once already"):
        await reverse("C-FAILED", "failed")
    assert (await h.get("C-FAILED"))["status"] == "succeeded"
    assert await h.usage() == usage
    check = await _verified(h)
    assert check.ok, check.problems


@pytest.mark.asyncio
async def test_a_reversal_refused_for_want_of_prefund_leaves_the_limits_untouched(
    start_gateway: StartGateway,
) -> None:
    """`failed → succeeded` needs the platform share back from the prefund; when it is no
    longer there the reversal is refused, and a refusal writes nothing: the resolution that
    catches it commits, so usage must still be the sum of the non-failed disbursements."""
    from gateway import outcomes
    from gateway.store import queries as q

    h = await start_gateway()
    await h.register()
    h.banks["bank-b"].script(reject(pre_execution=False))
    await h.accepted("C-FAILED", funder_hint="bank-b")
    await h.wait_status("C-FAILED", "failed")
    left = SHARE_B - 1
    resp = await h.client.post(
        "/v1/funders/bank-b/prefund",
        json={"reference": "WD-ALL-BUT", "amount": left - await h.prefund()},
        headers=AUTH,
    )
    assert resp.status == 201
    usage = await h.usage()

    async with h.pool.acquire() as conn, conn.transaction():  # as resolve_break does
        d = await q.find_by_txn(conn, "C-FAILED")
        assert d is not None
        attempt = (await q.attempts_of(conn, [d["id"]]))[d["id"]][-1]
        a = await q.lock_attempt(conn, attempt["id"])
        with pytest.raises(outcomes.CorrectionRefused):
            await outcomes.correct_terminal(conn, h.svc, a, "succeeded", by="ops", reason="x")

    assert (await h.get("C-FAILED"))["status"] == "failed"
    assert await h.usage() == usage
    assert await h.prefund() == left
    check = await _verified(h)
    assert check.ok, check.problems


class _WithdrawsBeforePrefundRead:
    """A connection on which, just before `verify` reads the prefund table, a withdrawal of
    `amount` commits through the API: what a live gateway may do while verify runs."""

    def __init__(self, conn: asyncpg.Connection, h: Harness, amount: int) -> None:
        self._conn, self._h, self._amount, self.fired = conn, h, amount, False

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        if "FROM prefund" in sql and not self.fired:
            self.fired = True
            resp = await self._h.client.post(
                "/v1/funders/bank-b/prefund",
                json={"reference": "WD-DURING-VERIFY", "amount": -self._amount},
                headers=AUTH,
            )
            assert resp.status == 201, await resp.text()
        return await self._conn.fetch(sql, *args)


@pytest.mark.asyncio
async def test_verify_reads_one_moment_so_a_concurrent_withdrawal_hides_nothing(
    start_gateway: StartGateway,
) -> None:
    """The prefund table and the journal disagree by 1,000 fen; a withdrawal of 1,000 fen
    committing between verify's read of the journal and its read of the table must not make
    them look equal: verify compares one snapshot of both."""
    h = await start_gateway()
    async with h.pool.acquire() as conn:
        await conn.execute("UPDATE prefund SET balance = balance + 1000 WHERE funder_id = 'bank-b'")
        racing = _WithdrawsBeforePrefundRead(conn, h, 1000)
        check = await ledger.verify(racing)  # type: ignore[arg-type]
        assert racing.fired
        assert not check.ok
        assert any("prefund of bank-b" in p for p in check.problems), check.problems


@pytest.mark.asyncio
async def test_verify_names_a_funders_account_that_disagrees_with_its_disbursements(
    start_gateway: StartGateway,
) -> None:
    """A balanced posting that moves a funder's share onto another funder's account leaves
    prefund, transit and payouts as they were: only the funders' accounts, compared with the
    shares of the disbursements they fund, show it."""
    h = await start_gateway()
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    h.banks["bank-b"].script(SUCCEED)
    await h.accepted("L-A", funder_hint="bank-a")
    await h.accepted("L-B", funder_hint="bank-b")
    await h.wait_status("L-A", "succeeded")
    await h.wait_status("L-B", "succeeded")
    check = await _verified(h)
    assert check.ok, check.problems
    async with h.pool.acquire() as conn:
        await ledger.post(
            conn, "misposted",
            [(ledger.funder_account("bank-a"), 100), (ledger.funder_account("bank-b"), -100)],
            day=h.svc.business_day(),
        )  # fmt: skip
    check = await _verified(h)
    assert not check.ok
    assert any("funder:bank-a" in p for p in check.problems), check.problems
    assert any("funder:bank-b" in p for p in check.problems), check.problems


@pytest.mark.asyncio
async def test_verify_names_custody_held_for_a_funder_without_prefund(
    start_gateway: StartGateway,
) -> None:
    h = await start_gateway()  # bank-a is direct: no prefund row, no custody
    async with h.pool.acquire() as conn:
        await ledger.custody_move(
            conn, "bank-a", 100, h.svc.business_day(), kind="misposted", reference="X"
        )
    check = await _verified(h)
    assert not check.ok
    assert any("prefund of bank-a" in p for p in check.problems), check.problems
