-- A co-lending candidate refused for its prefund keeps no lock on its usage rows.
--
-- fg_intake (0011) reserved a candidate's daily limit, then took the platform's share from
-- its prefund; when the prefund could not cover it, an UPDATE gave the usage back and the
-- loop went on to the next candidate, still holding the bucket rows that reservation had
-- locked (every bucket of the scope when it had rebalanced). Two intakes near their limits,
-- with the same two co-lending funders in opposite orders (a `funder_hint`), then each held
-- one funder's rows and waited for the other's: a deadlock, which PostgreSQL breaks after
-- `deadlock_timeout` by failing one of them (retried by the gateway, DEADLOCK_RETRIES, and a
-- 500 once those run out). fg_limit_reserve rolls back a refused step so that it holds
-- nothing; the reservation and the prefund are now one such step: a prefund refusal rolls
-- back the reservation with its locks. Direct candidates take no prefund and no extra
-- sub-transaction.

CREATE OR REPLACE FUNCTION fg_intake(
    p_row jsonb,                 -- the disbursements row (column -> value) for candidate 1
    p_name_bidx bytea,           -- blind index of the payee's account name
    p_name_checked boolean,      -- the caller already compared the name (see 'check_name')
    p_platform_cap bigint,
    p_buckets integer,
    p_bucket integer,
    p_funders text[],
    p_modes text[],
    p_caps bigint[],             -- each candidate's daily limit
    p_alloc_funder bigint[],
    p_alloc_platform bigint[],
    p_order_no text,
    p_bodies jsonb[],            -- the first response if that candidate is chosen
    p_vouchers text[],           -- the disbursement.accepted voucher per candidate
    p_ledger_vouchers text[]     -- the ledger.disbursement.accepted voucher per candidate
) RETURNS TABLE (outcome text, id bigint, chosen integer, request_hash bytea,
                 first_response jsonb, account_name_enc bytea)
LANGUAGE plpgsql AS $$
DECLARE
    did      bigint;
    aid      bigint;
    tx       bigint;
    i        integer;
    k        integer := 0;
    pb       integer;
    fb       integer;
    v_amount bigint := (p_row ->> 'amount')::bigint;
    v_day    date := (p_row ->> 'business_day')::date;
    v_txn    text := p_row ->> 'txn_no';
    v_now    timestamptz := (p_row ->> 'created_at')::timestamptz;
    refused  jsonb := '{}';
    acct     record;
BEGIN
    RETURN QUERY SELECT 'exists'::text, d.id, NULL::integer, d.request_hash, d.first_response,
                        NULL::bytea
                   FROM disbursements AS d WHERE d.txn_no = v_txn;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT a.name_bidx, a.account_name_enc INTO acct FROM borrower_accounts AS a
     WHERE a.borrower_id = p_row ->> 'borrower_id'
       AND a.account_bidx = (p_row ->> 'payee_account_bidx')::bytea
       AND a.bank_code = p_row ->> 'payee_bank_code';
    IF NOT FOUND OR (acct.name_bidx IS NOT NULL AND acct.name_bidx <> p_name_bidx) THEN
        RETURN QUERY SELECT 'not_whitelisted'::text, NULL::bigint, NULL::integer, NULL::bytea,
                            NULL::jsonb, NULL::bytea;
        RETURN;
    END IF;
    IF acct.name_bidx IS NULL AND NOT p_name_checked THEN
        RETURN QUERY SELECT 'check_name'::text, NULL::bigint, NULL::integer, NULL::bytea,
                            NULL::jsonb, acct.account_name_enc;
        RETURN;
    END IF;

    INSERT INTO disbursements (
        txn_no, request_hash, client, loan_id, borrower_id, amount, currency, term_unit,
        term_count, apr, product, repayment, payee_account_bidx, payee_account_no_enc,
        payee_account_name_enc, payee_account_masked, payee_name_masked, payee_bank_code,
        metadata, status, funder_id, mode, alloc_funder, alloc_platform, business_day,
        platform_bucket, first_response, created_at, updated_at)
    SELECT r.txn_no, r.request_hash, r.client, r.loan_id, r.borrower_id, r.amount, r.currency,
           r.term_unit, r.term_count, r.apr, r.product, r.repayment, r.payee_account_bidx,
           r.payee_account_no_enc, r.payee_account_name_enc, r.payee_account_masked,
           r.payee_name_masked, r.payee_bank_code, r.metadata, r.status, r.funder_id, r.mode,
           r.alloc_funder, r.alloc_platform, r.business_day, p_bucket, p_bodies[1],
           r.created_at, r.updated_at
      FROM jsonb_populate_record(NULL::disbursements, p_row) AS r
    ON CONFLICT (txn_no) DO NOTHING
    RETURNING disbursements.id INTO did;
    IF did IS NULL THEN  -- a concurrent duplicate committed first
        RETURN QUERY SELECT 'exists'::text, d.id, NULL::integer, d.request_hash, d.first_response,
                            NULL::bytea
                       FROM disbursements AS d WHERE d.txn_no = v_txn;
        RETURN;
    END IF;

    pb := fg_limit_reserve('platform', v_day, p_bucket, v_amount, p_platform_cap, p_buckets);
    IF pb < 0 THEN
        RAISE EXCEPTION 'the platform daily limit would be exceeded' USING ERRCODE = 'FG001';
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_funders, 1), 0) LOOP
        IF p_alloc_platform[i] = 0 THEN
            fb := fg_limit_reserve('funder:' || p_funders[i], v_day, p_bucket, v_amount,
                                   p_caps[i], p_buckets);
        ELSE
            BEGIN  -- the usage and the prefund together, or neither (and no lock kept)
                fb := fg_limit_reserve('funder:' || p_funders[i], v_day, p_bucket, v_amount,
                                       p_caps[i], p_buckets);
                IF fb >= 0 THEN
                    UPDATE prefund SET balance = balance - p_alloc_platform[i], updated_at = now()
                     WHERE funder_id = p_funders[i] AND balance >= p_alloc_platform[i];
                    IF NOT FOUND THEN
                        RAISE EXCEPTION USING ERRCODE = 'FG000';
                    END IF;
                END IF;
            EXCEPTION WHEN SQLSTATE 'FG000' THEN
                refused := refused || jsonb_build_object(p_funders[i], 'prefund_insufficient');
                CONTINUE;
            END;
        END IF;
        IF fb < 0 THEN
            refused := refused || jsonb_build_object(p_funders[i], 'daily_limit');
            CONTINUE;
        END IF;
        k := i;
        EXIT;
    END LOOP;
    IF k = 0 THEN
        RAISE EXCEPTION 'every eligible funder refused' USING ERRCODE = 'FG002',
              DETAIL = refused::text;
    END IF;

    IF k > 1 OR pb <> p_bucket THEN  -- routed past the first candidate, or another bucket
        UPDATE disbursements
           SET funder_id = p_funders[k], mode = p_modes[k], alloc_funder = p_alloc_funder[k],
               alloc_platform = p_alloc_platform[k], first_response = p_bodies[k],
               platform_bucket = pb
         WHERE disbursements.id = did;
    END IF;
    INSERT INTO attempts (disbursement_id, n, funder_id, order_no, status, mode, alloc_funder,
                          alloc_platform, limit_bucket, created_at, updated_at)
    VALUES (did, 1, p_funders[k], p_order_no, 'accepted', p_modes[k], p_alloc_funder[k],
            p_alloc_platform[k], fb, v_now, v_now)
    RETURNING attempts.id INTO aid;
    INSERT INTO outbox (kind, ref_id, funder_id) VALUES ('dispatch', aid, p_funders[k]);

    INSERT INTO ledger_transactions (kind, txn_no, funder_id)
    VALUES ('disbursement.accepted', v_txn, p_funders[k])
    RETURNING ledger_transactions.id INTO tx;
    INSERT INTO ledger_entries (tx_id, account, amount, business_day)
    SELECT tx, e.account, e.amount, v_day
      FROM (VALUES ('transit:' || p_funders[k], v_amount),
                   ('funder:' || p_funders[k], -p_alloc_funder[k]),
                   ('custody:prefund:' || p_funders[k], -p_alloc_platform[k])) AS e (account, amount)
     WHERE e.amount <> 0;
    INSERT INTO voucher_events (kind, txn_no, event)
    VALUES ('ledger.disbursement.accepted', v_txn,
            replace(p_ledger_vouchers[k], '"tx":-1', '"tx":' || tx)),
           ('disbursement.accepted', v_txn, p_vouchers[k]);
    RETURN QUERY SELECT 'created'::text, did, k, NULL::bytea, NULL::jsonb, NULL::bytea;
END $$;
