-- Reconciliation compares the ledger's settled payouts of a funder and business day with the
-- statement of that day: the payout account's entries of one day, without scanning its
-- whole history.
CREATE INDEX ledger_entries_account_day ON ledger_entries (account, business_day);
