-- Every process looks at start-up for rows written before personal data was encrypted
-- (gateway/pii.py: plaintext still in a legacy_* column, a name without its blind index).
-- Once there are none, that look-up read the whole table each time: 0.35 s per million
-- disbursements, past the queries' 30 s limit at a hundred million. These indexes hold only
-- the rows still to convert, so they are empty in the steady state and cost an insert nothing.

CREATE INDEX disbursements_legacy_payee ON disbursements (id)
    WHERE legacy_payee_account_no IS NOT NULL;
CREATE INDEX borrower_accounts_legacy ON borrower_accounts (id)
    WHERE legacy_account_no IS NOT NULL;
CREATE INDEX borrower_accounts_name_unindexed ON borrower_accounts (id)
    WHERE name_bidx IS NULL AND account_name_enc IS NOT NULL;
