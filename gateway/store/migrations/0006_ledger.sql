-- A double-entry journal in integer fen, append-only. Every transaction's entries sum to zero.
-- Accounts (no account ever holds the platform's own operating money):
--   funder:<id>             the funder's money lent out (its share of each disbursement)
--   custody:prefund:<id>    the platform's co-lending prefund held in custody (存管) at <id>
--   external:custody        money entering or leaving custody (top-ups, withdrawals)
--   transit:<id>            accepted disbursements not yet settled at <id>
--   payout:borrowers        money paid out to borrowers
CREATE TABLE ledger_transactions (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL,
    txn_no      text,
    reference   text,
    funder_id   text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_transactions_txn ON ledger_transactions (txn_no) WHERE txn_no IS NOT NULL;

CREATE TABLE ledger_entries (
    id          bigserial   PRIMARY KEY,
    tx_id       bigint      NOT NULL REFERENCES ledger_transactions (id),
    account     text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount <> 0),   -- debit > 0, credit < 0
    business_day date       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account ON ledger_entries (account, id);

-- Append-only: entries and transactions can be added, never changed or removed.
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_transactions_append_only BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- Prefund top-ups and withdrawals by ops, idempotent by reference.
CREATE TABLE prefund_operations (
    reference   text        PRIMARY KEY,
    funder_id   text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount <> 0),   -- > 0 top-up, < 0 withdrawal
    note        text,
    client      text        NOT NULL,
    balance_after bigint    NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
