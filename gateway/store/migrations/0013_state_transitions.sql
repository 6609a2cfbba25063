-- A state transition of an attempt as one server-side function, as intake is (0011).
--
-- The dispatcher's record of a bank's answer and a bank's callback were a transaction each of
-- 8 to 15 statements: lock the attempt, update it, release limits or post the ledger, update
-- the disbursement, write the vouchers, render the resource for the webhook, enqueue it, settle
-- the outbox row or remember the nonce. Each statement was a round trip, and the row locks
-- were held across the gateway's event loop between them (backends "idle in transaction",
-- callbacks queueing behind the dispatcher's record of the same attempt). `fg_move` does all
-- of it in one statement; the caller decides (the state machine, the voucher texts, the ledger
-- lines, the limit releases all stay in Python: gateway/outcomes.py) and the function only
-- checks that the attempt is still in the state the caller decided from, then writes.
--
-- Compare-and-set: a caller may decide from a row read without a lock; when the attempt's
-- status is no longer `p_from` the function changes nothing and answers 'stale', and the
-- caller reads again and decides again (states only move forward, so this ends). A caller
-- that holds the attempt's lock (the poller, reconciliation, the dispatcher's rare paths)
-- never sees 'stale'.


-- A timestamp as Python's `datetime.isoformat()` writes it in UTC, with "Z": the fraction
-- only when there is one (gateway/disbursements.py `iso`).
CREATE OR REPLACE FUNCTION fg_iso(t timestamptz) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN extract(microseconds FROM t)::bigint % 1000000 = 0 THEN ''
                   ELSE to_char(t AT TIME ZONE 'UTC', '.US') END
           || 'Z'
$$;


-- The API resource of a disbursement (CONTRACT.md), as gateway/disbursements.py `render`
-- builds it: the body of the outcome webhook, rendered in the transaction of the outcome.
CREATE OR REPLACE FUNCTION fg_resource(p_id bigint) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
               'txn_no', d.txn_no,
               'status', d.status,
               'funder_id', d.funder_id,
               'mode', d.mode,
               'allocation', jsonb_build_object('funder', d.alloc_funder,
                                                'platform', d.alloc_platform),
               'amount', d.amount,
               'currency', d.currency,
               'payee', jsonb_build_object('account_no', d.payee_account_masked,
                                           'account_name', d.payee_name_masked,
                                           'bank_code', d.payee_bank_code),
               'attempts', coalesce(
                   (SELECT jsonb_agg(jsonb_build_object('n', a.n, 'funder_id', a.funder_id,
                                                        'order_no', a.order_no,
                                                        'status', a.status,
                                                        'bank_ref', a.bank_ref,
                                                        'error', a.error) ORDER BY a.n)
                      FROM attempts AS a WHERE a.disbursement_id = d.id),
                   '[]'::jsonb),
               'failure', d.failure,
               'created_at', fg_iso(d.created_at),
               'updated_at', fg_iso(d.updated_at))
      FROM disbursements AS d WHERE d.id = p_id
$$;


-- Lock the attempt and its disbursement (as queries.lock_attempt does, same order); unless the
-- attempt's status is `p_from` answer 'stale'. Then remember the callback's nonce (a nonce seen
-- before: 'replayed', nothing written), delete the settled outbox row, and, when `p_new` is
-- given, move the attempt: the attempt row, the limit releases (in the order given: the
-- platform's first), the ledger posting with its voucher (its text carries "tx":-1 for the
-- ledger transaction id, as fg_intake's does), the disbursement row, the state voucher, and
-- for a terminal state the webhook row with the resource. Answers 'moved', 'unchanged' (no
-- `p_new`), 'stale', 'replayed' or 'missing' (no such attempt). No NOTIFY here: it would
-- serialise every such commit (gateway/wakeups.py); the caller wakes the notifiers after.
CREATE OR REPLACE FUNCTION fg_move(
    p_attempt bigint,
    p_from text,
    p_new text,
    p_now timestamptz,
    p_bank_ref text,                -- NULL keeps the attempt's
    p_error jsonb,                  -- the attempt's error; NULL keeps it
    p_failure jsonb,                -- the disbursement's failure; NULL keeps it
    p_next_query_at timestamptz,    -- the attempt's next status query (NULL: none)
    p_query_count integer,          -- NULL keeps the attempt's
    p_unknown_since timestamptz,    -- set when the attempt has none yet
    p_release_scopes text[],        -- limit usage to give back: scope, bucket, amount
    p_release_buckets integer[],
    p_release_amounts bigint[],
    p_prefund_return bigint,        -- the platform's share back to the funder's prefund
    p_ledger_kind text,             -- NULL: no posting
    p_ledger_accounts text[],
    p_ledger_amounts bigint[],
    p_ledger_voucher text,
    p_voucher_kind text,
    p_voucher text,
    p_webhook boolean,              -- enqueue the outcome webhook (terminal, a lending core)
    p_finish_outbox bigint,         -- an outbox row settled by this change (NULL: none)
    p_nonce_funder text,            -- a callback's nonce to remember (NULL: none)
    p_nonce text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    cur record;
    tx  bigint;
    i   integer;
BEGIN
    SELECT a.status, a.funder_id, a.disbursement_id, d.txn_no, d.business_day INTO cur
      FROM attempts AS a JOIN disbursements AS d ON d.id = a.disbursement_id
     WHERE a.id = p_attempt
       FOR UPDATE OF a, d;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    IF cur.status IS DISTINCT FROM p_from THEN
        RETURN 'stale';
    END IF;
    IF p_nonce IS NOT NULL THEN
        INSERT INTO callback_nonces (funder_id, nonce) VALUES (p_nonce_funder, p_nonce)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'replayed';
        END IF;
    END IF;
    IF p_finish_outbox IS NOT NULL THEN
        DELETE FROM outbox WHERE id = p_finish_outbox;
    END IF;
    IF p_new IS NULL THEN
        RETURN 'unchanged';
    END IF;

    UPDATE attempts
       SET status = p_new, updated_at = p_now,
           bank_ref = coalesce(p_bank_ref, bank_ref),
           error = coalesce(p_error, error),
           next_query_at = p_next_query_at,
           query_count = coalesce(p_query_count, query_count),
           unknown_since = coalesce(unknown_since, p_unknown_since)
     WHERE id = p_attempt;
    FOR i IN 1 .. coalesce(array_length(p_release_scopes, 1), 0) LOOP
        UPDATE limit_usage
           SET used = used - p_release_amounts[i], share = share - p_release_amounts[i]
         WHERE scope = p_release_scopes[i] AND business_day = cur.business_day
           AND bucket = p_release_buckets[i];
    END LOOP;
    IF coalesce(p_prefund_return, 0) <> 0 THEN
        UPDATE prefund SET balance = balance + p_prefund_return, updated_at = now()
         WHERE funder_id = cur.funder_id;
    END IF;
    IF p_ledger_kind IS NOT NULL THEN
        INSERT INTO ledger_transactions (kind, txn_no, funder_id)
        VALUES (p_ledger_kind, cur.txn_no, cur.funder_id)
        RETURNING id INTO tx;
        INSERT INTO ledger_entries (tx_id, account, amount, business_day)
        SELECT tx, e.account, e.amount, cur.business_day
          FROM unnest(p_ledger_accounts, p_ledger_amounts) AS e (account, amount);
        INSERT INTO voucher_events (kind, txn_no, event)
        VALUES ('ledger.' || p_ledger_kind, cur.txn_no,
                replace(p_ledger_voucher, '"tx":-1', '"tx":' || tx));
    END IF;
    UPDATE disbursements
       SET status = p_new, updated_at = p_now, failure = coalesce(p_failure, failure)
     WHERE id = cur.disbursement_id;
    INSERT INTO voucher_events (kind, txn_no, event) VALUES (p_voucher_kind, cur.txn_no, p_voucher);
    IF p_webhook THEN
        INSERT INTO outbox (kind, ref_id, payload)
        VALUES ('webhook', cur.disbursement_id, fg_resource(cur.disbursement_id));
    END IF;
    RETURN 'moved';
END $$;
