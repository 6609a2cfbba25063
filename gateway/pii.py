"""Where personal data meets the database: encrypt on write, blind-index for look-ups, mask
for display, decrypt only where a bank needs the value; plus re-encryption for key rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from gateway.crypto import Vault
from gateway.masking import mask_account, mask_name

log = structlog.get_logger("fundgate.pii")

ACCOUNT_INDEX = "account_no"  # one index context: the same account matches across tables
NAME_INDEX = "account_name"  # the whitelisted name, compared by intake inside the database

# (table, key column, [(plaintext legacy column, encrypted column, context, masked column)])
COLUMNS: dict[str, list[tuple[str, str, str, str]]] = {
    "borrower_accounts": [
        ("legacy_account_no", "account_no_enc", "borrower_accounts.account_no", "account_masked"),
        ("legacy_account_name", "account_name_enc", "borrower_accounts.account_name",
         "name_masked"),
    ],
    "disbursements": [
        ("legacy_payee_account_no", "payee_account_no_enc", "disbursements.payee_account_no",
         "payee_account_masked"),
        ("legacy_payee_account_name", "payee_account_name_enc",
         "disbursements.payee_account_name", "payee_name_masked"),
    ],
}  # fmt: skip
BIDX = {"borrower_accounts": "account_bidx", "disbursements": "payee_account_bidx"}


def account_index(vault: Vault, account_no: str) -> bytes:
    return vault.blind(account_no, ACCOUNT_INDEX)


def name_index(vault: Vault, account_name: str) -> bytes:
    return vault.blind(account_name, NAME_INDEX)


def account_columns(vault: Vault, account_no: str, account_name: str) -> dict[str, Any]:
    return {
        "account_bidx": account_index(vault, account_no),
        "name_bidx": name_index(vault, account_name),
        "account_no_enc": vault.encrypt(account_no, "borrower_accounts.account_no"),
        "account_name_enc": vault.encrypt(account_name, "borrower_accounts.account_name"),
        "account_masked": mask_account(account_no),
        "name_masked": mask_name(account_name),
    }


def payee_columns(vault: Vault, account_no: str, account_name: str) -> dict[str, Any]:
    return {
        "payee_account_bidx": account_index(vault, account_no),
        "payee_account_no_enc": vault.encrypt(account_no, "disbursements.payee_account_no"),
        "payee_account_name_enc": vault.encrypt(account_name, "disbursements.payee_account_name"),
        "payee_account_masked": mask_account(account_no),
        "payee_name_masked": mask_name(account_name),
    }


def account_name(vault: Vault, row: asyncpg.Record) -> str:
    return vault.decrypt(row["account_name_enc"], "borrower_accounts.account_name")


def payee(vault: Vault, row: asyncpg.Record) -> tuple[str, str]:
    """The payee's account number and name, for the bank and nobody else."""
    return (
        vault.decrypt(row["payee_account_no_enc"], "disbursements.payee_account_no"),
        vault.decrypt(row["payee_account_name_enc"], "disbursements.payee_account_name"),
    )


async def index_names(conn: asyncpg.Connection | Any, vault: Vault, batch: int = 500) -> int:
    """Give whitelist rows registered before `name_bidx` existed their name's blind index."""
    done = 0
    while True:
        rows = await conn.fetch(
            "SELECT id, account_name_enc FROM borrower_accounts"
            " WHERE name_bidx IS NULL AND account_name_enc IS NOT NULL LIMIT $1",
            batch,
        )
        if not rows:
            break
        await conn.executemany(
            "UPDATE borrower_accounts SET name_bidx = $2 WHERE id = $1",
            [(r["id"], name_index(vault, account_name(vault, r))) for r in rows],
        )
        done += len(rows)
    if done:
        log.info("pii.names_indexed", rows=done)
    return done


async def encrypt_legacy(conn: asyncpg.Connection | Any, vault: Vault, batch: int = 500) -> int:
    """Encrypt rows written before encryption existed and clear their plaintext."""
    done = 0
    for table, cols in COLUMNS.items():
        key = "id"
        while True:
            rows = await conn.fetch(
                f"SELECT {key}, {', '.join(c[0] for c in cols)} FROM {table}"
                f" WHERE {cols[0][0]} IS NOT NULL LIMIT $1",
                batch,
            )
            if not rows:
                break
            async with conn.transaction():
                for r in rows:
                    sets: dict[str, Any] = {BIDX[table]: account_index(vault, r[cols[0][0]])}
                    for legacy, enc, context, masked in cols:
                        plain = r[legacy]
                        sets[enc] = vault.encrypt(plain, context)
                        sets[masked] = (mask_account if "no" in enc else mask_name)(plain)
                        sets[legacy] = None
                    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(sets, start=2))
                    await conn.execute(
                        f"UPDATE {table} SET {assignments} WHERE {key} = $1",
                        r[key],
                        *sets.values(),
                    )
            done += len(rows)
    if done:
        log.info("pii.legacy_encrypted", rows=done)
    return done


async def rotate(
    conn: asyncpg.Connection | Any,
    vault: Vault,
    *,
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-encrypt every value not under the active key, a batch per transaction."""
    changed = 0
    for table, cols in COLUMNS.items():
        last = 0
        while True:
            rows = await conn.fetch(
                f"SELECT id, {', '.join(c[1] for c in cols)} FROM {table}"
                " WHERE id > $1 ORDER BY id LIMIT $2",
                last,
                batch,
            )
            if not rows:
                break
            async with conn.transaction():
                for r in rows:
                    sets: dict[str, bytes] = {}
                    for _, enc, context, _ in cols:
                        blob = r[enc]
                        if blob is not None and vault.key_id(blob) != vault.active:
                            sets[enc] = vault.encrypt(vault.decrypt(blob, context), context)
                    if sets:
                        assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(sets, start=2))
                        await conn.execute(
                            f"UPDATE {table} SET {assignments} WHERE id = $1", r["id"],
                            *sets.values(),
                        )  # fmt: skip
                        changed += 1
            last = rows[-1]["id"]
            if progress is not None:
                progress(len(rows))
    return changed
