-- Personal data at rest: account numbers and names are stored encrypted (AES-GCM, key id in
-- the blob) with a keyed blind index for equality look-ups, and a masked copy for display.
-- Rows written before this migration keep their values in legacy_* columns only until the
-- gateway's start-up encrypts them and clears those columns (gateway/pii.py).
ALTER TABLE borrower_accounts DROP CONSTRAINT borrower_accounts_pkey;
ALTER TABLE borrower_accounts RENAME COLUMN account_no TO legacy_account_no;
ALTER TABLE borrower_accounts RENAME COLUMN account_name TO legacy_account_name;
ALTER TABLE borrower_accounts
    ALTER COLUMN legacy_account_no DROP NOT NULL,
    ALTER COLUMN legacy_account_name DROP NOT NULL,
    ADD COLUMN id bigserial PRIMARY KEY,
    ADD COLUMN account_bidx bytea,
    ADD COLUMN account_no_enc bytea,
    ADD COLUMN account_name_enc bytea,
    ADD COLUMN account_masked text,
    ADD COLUMN name_masked text;
CREATE UNIQUE INDEX borrower_accounts_lookup ON borrower_accounts (borrower_id, account_bidx);

ALTER TABLE disbursements RENAME COLUMN payee_account_no TO legacy_payee_account_no;
ALTER TABLE disbursements RENAME COLUMN payee_account_name TO legacy_payee_account_name;
ALTER TABLE disbursements
    ALTER COLUMN legacy_payee_account_no DROP NOT NULL,
    ALTER COLUMN legacy_payee_account_name DROP NOT NULL,
    ADD COLUMN payee_account_bidx bytea,
    ADD COLUMN payee_account_no_enc bytea,
    ADD COLUMN payee_account_name_enc bytea,
    ADD COLUMN payee_account_masked text,
    ADD COLUMN payee_name_masked text;
