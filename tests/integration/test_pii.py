"""Personal data at rest: encrypted with key ids, found through the blind index, never in
plaintext in any table or log line, and re-encrypted when keys rotate."""

from __future__ import annotations

import base64
import io
import os
import subprocess

import asyncpg
import pytest
from pydantic import SecretStr

from config.models import SecurityConfig
from gateway import pii
from gateway.crypto import CryptoError, Vault
from gateway.logging import configure_logging
from gateway.store.embedded import POSTGRES_BIN_PATH
from tests.fakes import SUCCEED
from tests.integration.conftest import ACCOUNT, StartGateway

pytestmark = pytest.mark.integration

DIGITS = ACCOUNT["account_no"]
NAME = ACCOUNT["account_name"]


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _security(keys: dict[str, str], active: str, index: str) -> SecurityConfig:
    return SecurityConfig(
        data_keys={k: SecretStr(v) for k, v in keys.items()},
        active_key=active,
        blind_index_key=SecretStr(index),
    )


@pytest.mark.asyncio
async def test_no_plaintext_account_or_name_in_the_database_dump_or_the_logs(
    start_gateway: StartGateway, clean_db: str
) -> None:
    logs = io.StringIO()
    configure_logging("json", "debug", stream=logs)
    try:
        h = await start_gateway()
        await h.register()
        h.banks["bank-a"].script(SUCCEED)
        h.banks["bank-b"].script(SUCCEED)
        await h.accepted("PII-1")
        await h.accepted("PII-2", funder_hint="bank-b")
        await h.wait_status("PII-1", "succeeded")
        await h.wait_status("PII-2", "succeeded")
        listed = await h.client.get("/v1/borrowers/B1/accounts", headers={"Authorization":
                                    "Bearer demo-token"})  # fmt: skip
        assert DIGITS not in await listed.text()
        # the banks did get the real account: decryption works where it must
        assert {e.order.account_no for b in h.banks.values() for e in b.ledger.values()} == {DIGITS}
    finally:
        configure_logging("json", "info")
    dump = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", clean_db],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "PII-1" in dump  # the dump has the data...
    assert DIGITS not in dump  # ...but not the account number
    assert NAME not in dump
    assert DIGITS[-8:] not in dump
    text = logs.getvalue()
    assert "PII-1" in text
    assert DIGITS not in text
    assert NAME not in text


@pytest.mark.asyncio
async def test_rotation_reencrypts_under_the_new_key_and_old_rows_stay_readable(
    start_gateway: StartGateway, pool: asyncpg.Pool
) -> None:
    k1, k2, index = _key(), _key(), _key()
    h = await start_gateway()
    old = Vault(_security({"k1": k1}, "k1", index))
    h.svc.vault = old
    await h.register()
    h.banks["bank-a"].script(SUCCEED)
    await h.accepted("ROT-1")
    await h.wait_status("ROT-1", "succeeded")

    both = Vault(_security({"k1": k1, "k2": k2}, "k2", index))
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM disbursements WHERE txn_no = 'ROT-1'")
        assert Vault.key_id(row["payee_account_no_enc"]) == "k1"
        assert pii.payee(both, row) == (DIGITS, NAME)  # readable before rotation
        changed = await pii.rotate(conn, both, batch=1)
        assert changed == 2  # one whitelist row, one disbursement
        assert await pii.rotate(conn, both) == 0  # nothing left under k1
        row = await conn.fetchrow("SELECT * FROM disbursements WHERE txn_no = 'ROT-1'")
        acct = await conn.fetchrow("SELECT * FROM borrower_accounts")
    assert Vault.key_id(row["payee_account_no_enc"]) == "k2"
    assert pii.payee(both, row) == (DIGITS, NAME)
    assert pii.account_name(both, acct) == NAME
    # whitelist look-ups keep working after rotation: the blind index key did not change
    h.svc.vault = both
    await h.accepted("ROT-2")


@pytest.mark.asyncio
async def test_wrong_or_missing_key_is_a_precise_error() -> None:
    index = _key()
    v1 = Vault(_security({"k1": _key()}, "k1", index))
    blob = v1.encrypt(DIGITS, "disbursements.payee_account_no")
    missing = Vault(_security({"k2": _key()}, "k2", index))
    with pytest.raises(CryptoError, match="key 'k1', which is not configured"):
        missing.decrypt(blob, "disbursements.payee_account_no")
    wrong = Vault(_security({"k1": _key()}, "k1", index))
    with pytest.raises(CryptoError, match="key 'k1' does not open"):
        wrong.decrypt(blob, "disbursements.payee_account_no")
    with pytest.raises(CryptoError):  # a value moved to another column does not decrypt
        v1.decrypt(blob, "borrower_accounts.account_no")
    with pytest.raises(CryptoError, match="version"):
        v1.decrypt(b"\x09junk", "x")


def test_security_config_refuses_bad_keys() -> None:
    with pytest.raises(ValueError, match="active_key 'k9' is not among data_keys"):
        _security({"k1": _key()}, "k9", _key())
    with pytest.raises(ValueError, match="32 bytes"):
        _security({"k1": base64.b64encode(b"short").decode()}, "k1", _key())
    with pytest.raises(ValueError, match="blind_index_key: not base64"):
        _security({"k1": _key()}, "k1", "%%%")


@pytest.mark.asyncio
async def test_rows_written_before_encryption_are_encrypted_at_start(
    start_gateway: StartGateway, pool: asyncpg.Pool
) -> None:
    h = await start_gateway()
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO borrower_accounts (borrower_id, legacy_account_no,"
            " legacy_account_name, bank_code) VALUES ('OLD', $1, $2, 'ICBC')",
            DIGITS,
            NAME,
        )
        assert await pii.encrypt_legacy(conn, h.svc.vault) == 1
        row = await conn.fetchrow("SELECT * FROM borrower_accounts WHERE borrower_id = 'OLD'")
    assert row["legacy_account_no"] is None
    assert row["legacy_account_name"] is None
    assert row["account_masked"] == "622202*********3445"
    assert pii.account_name(h.svc.vault, row) == NAME
    await h.register("OLD")  # the same account again: found through the blind index
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM borrower_accounts WHERE borrower_id = 'OLD'")
            == 1
        )


@pytest.mark.asyncio
async def test_a_whitelist_entry_without_a_name_index_is_checked_by_name_then_indexed(
    start_gateway: StartGateway,
) -> None:
    """Intake compares the name through its blind index inside the database; an entry from
    before that index existed is compared after decryption, and indexed at the next start."""
    h = await start_gateway(role="api")
    await h.register()
    async with h.pool.acquire() as conn:
        await conn.execute("UPDATE borrower_accounts SET name_bidx = NULL")
    status, body = await h.disburse("PII-OLD-WRONG", payee={**ACCOUNT, "account_name": "李四"})
    assert (status, body["error"]["code"]) == (422, "payee_not_whitelisted")
    await h.accepted("PII-OLD-RIGHT")

    async with h.pool.acquire() as conn:
        assert await pii.index_names(conn, h.svc.vault) == 1
        assert await pii.index_names(conn, h.svc.vault) == 0
        stored = await conn.fetchval("SELECT name_bidx FROM borrower_accounts")
    assert stored == pii.name_index(h.svc.vault, NAME)
    status, body = await h.disburse("PII-NEW-WRONG", payee={**ACCOUNT, "account_name": "李四"})
    assert (status, body["error"]["code"]) == (422, "payee_not_whitelisted")
    await h.accepted("PII-NEW-RIGHT")


@pytest.mark.asyncio
async def test_once_everything_is_converted_a_start_reads_no_table_from_end_to_end(
    start_gateway: StartGateway,
) -> None:
    """Every process looks at start-up for rows still to encrypt or index. Once there are
    none, the look-ups are answered by indexes holding only such rows (migration 0016): a
    table read end to end costs 0.35 s per million disbursements at every start, past the
    queries' 30 s limit at a hundred million. Sequential scans are ruled out here, so a
    look-up without an index would still take one and be counted."""
    h = await start_gateway(role="api")
    await h.register()
    await h.accepted("PII-SCAN")

    async def seq_scans(conn: asyncpg.Connection) -> dict[str, int]:
        # counted by this backend and not yet flushed, which may include an earlier
        # transaction's (the start-up's): only the difference tells
        rows = await conn.fetch(
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('disbursements', 'borrower_accounts')"
        )
        return {r["relname"]: r["seq_scan"] for r in rows}

    async with h.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        before = await seq_scans(conn)
        assert await pii.encrypt_legacy(conn, h.svc.vault) == 0
        assert await pii.index_names(conn, h.svc.vault) == 0
        after = await seq_scans(conn)
    scans = {t: after[t] - before[t] for t in after}
    assert scans == {"disbursements": 0, "borrower_accounts": 0}
