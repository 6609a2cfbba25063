-- A disbursement's outcome webhooks go out in the order they were written (queries.claim):
-- a person's reversal of a final outcome must not overtake the webhook of that outcome while
-- it waits out a back-off, or the lending core, which dedups by txn_no + status, keeps the
-- outcome that was reversed. The claim skips a webhook row while an older one of the same
-- disbursement is in the outbox; this index answers that question per row claimed.

CREATE INDEX outbox_webhook_ref ON outbox (ref_id, id) WHERE kind = 'webhook';
