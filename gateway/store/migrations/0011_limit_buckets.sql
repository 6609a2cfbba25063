-- Daily limits in buckets, and intake as one server-side function.
--
-- A scope's daily usage (the platform's, each funder's) was one row: every intake locked it
-- from its reservation to its commit, so one hot row serialised all intake. Now a scope's
-- usage is spread over buckets; each bucket holds a `share` of the cap and reserves only
-- within it (`used + amount <= share`), and the shares of a scope never sum past the cap it
-- was split from, so the buckets together never overshoot, however many processes reserve
-- at once. When the chosen bucket has no room, `fg_limit_rebalance` locks all of the scope's
-- buckets in bucket order, checks the whole day against the cap and splits what is left
-- evenly again; that is also how a changed cap (a new config) takes effect, since a bucket
-- whose `cap` is not the caller's never reserves by itself.
--
-- Invariants (CHECKs below): 0 <= used <= share in every bucket; and for every scope and
-- day, sum(share) <= max(cap, sum(used)), which the functions keep: a reservation adds to
-- `used` only within `share`; a release takes back `used` and `share` alike (the freed room
-- returns at the next rebalance); a rebalance sets sum(share) = max(cap, sum(used)).

ALTER TABLE limit_usage
    ADD COLUMN bucket integer NOT NULL DEFAULT 0 CHECK (bucket >= 0),
    ADD COLUMN share  bigint  NOT NULL DEFAULT 0,
    ADD COLUMN cap    bigint  NOT NULL DEFAULT -1;   -- the cap the shares were split from
UPDATE limit_usage SET share = used;                 -- full: the next reservation rebalances
ALTER TABLE limit_usage
    DROP CONSTRAINT limit_usage_pkey,
    ADD PRIMARY KEY (scope, business_day, bucket),
    ADD CONSTRAINT limit_usage_within_share CHECK (used <= share);

-- a keyed digest (blind index) of the whitelisted account name, so that intake checks the
-- whitelist inside fg_intake; NULL for rows written before it (filled at start, pii.py)
ALTER TABLE borrower_accounts ADD COLUMN name_bidx bytea;

-- which bucket holds a disbursement's platform usage, and an attempt's funder usage
ALTER TABLE disbursements ADD COLUMN platform_bucket integer NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN limit_bucket integer NOT NULL DEFAULT 0;


-- Lock every bucket of the scope's day (creating missing ones), then, unless the day with
-- `amount` would pass `cap` (and `force` is false), add `amount` to bucket `p_bucket` and
-- split the room left under the cap evenly over the buckets. `force` records money that
-- already moved: added even past the cap, leaving no room.
CREATE OR REPLACE FUNCTION fg_limit_rebalance(
    p_scope text, p_day date, p_bucket integer, p_amount bigint, p_cap bigint,
    p_buckets integer, p_force boolean
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
    n     integer;
    free  bigint;
BEGIN
    INSERT INTO limit_usage (scope, business_day, bucket, used, share, cap)
    SELECT p_scope, p_day, g, 0, 0, -1
      FROM generate_series(0, greatest(p_buckets, p_bucket + 1) - 1) AS g
    ON CONFLICT DO NOTHING;
    SELECT coalesce(sum(l.used), 0), count(*) INTO total, n
      FROM (SELECT used FROM limit_usage
             WHERE scope = p_scope AND business_day = p_day
             ORDER BY bucket FOR UPDATE) AS l;
    IF NOT p_force AND total + p_amount > p_cap THEN
        RETURN false;
    END IF;
    free := greatest(p_cap - total - p_amount, 0);
    UPDATE limit_usage AS u
       SET used  = u.used + CASE WHEN u.bucket = p_bucket THEN p_amount ELSE 0 END,
           share = u.used + CASE WHEN u.bucket = p_bucket THEN p_amount ELSE 0 END
                   + free / n + CASE WHEN r.rn < free % n THEN 1 ELSE 0 END,
           cap   = p_cap
      FROM (SELECT bucket, row_number() OVER (ORDER BY bucket) - 1 AS rn
              FROM limit_usage WHERE scope = p_scope AND business_day = p_day) AS r
     WHERE u.scope = p_scope AND u.business_day = p_day AND u.bucket = r.bucket;
    RETURN true;
END $$;


-- Reserve `amount` of the scope's day under `cap`; returns the bucket that holds it, or -1
-- when the day has no room. In order: the first bucket with room that nobody holds, starting
-- at `p_bucket` (SKIP LOCKED: no waiting behind a transaction still committing); else
-- `p_bucket` itself, waiting for it (every bucket busy); else a rebalance (every bucket of
-- the scope locked, in bucket order).
--
-- Each step runs in a sub-transaction that is rolled back when it does not reserve. That
-- matters: a row whose re-check failed after a wait stays locked, and a rebalance refused
-- holds all of them; kept, such a lock out of bucket order (or of one funder's buckets
-- while trying the next funder) could deadlock with a concurrent rebalance. Rolled back, a
-- failed step holds nothing.
CREATE OR REPLACE FUNCTION fg_limit_reserve(
    p_scope text, p_day date, p_bucket integer, p_amount bigint, p_cap bigint, p_buckets integer
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    b integer;
BEGIN
    IF p_amount > p_cap THEN
        RETURN -1;
    END IF;
    BEGIN
        WITH free AS MATERIALIZED (   -- evaluated once: one row locked, one row updated
            SELECT l.bucket FROM limit_usage AS l
             WHERE l.scope = p_scope AND l.business_day = p_day AND l.cap = p_cap
               AND l.used + p_amount <= l.share
             ORDER BY (l.bucket - p_bucket + p_buckets * 1000) % greatest(p_buckets, 1)
             LIMIT 1 FOR UPDATE SKIP LOCKED)
        UPDATE limit_usage AS u SET used = u.used + p_amount
          FROM free
         WHERE u.scope = p_scope AND u.business_day = p_day AND u.bucket = free.bucket
        RETURNING u.bucket INTO b;
        IF b IS NOT NULL THEN
            RETURN b;
        END IF;
        UPDATE limit_usage SET used = used + p_amount
         WHERE scope = p_scope AND business_day = p_day AND bucket = p_bucket
           AND cap = p_cap AND used + p_amount <= share;
        IF FOUND THEN
            RETURN p_bucket;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FG000';
    EXCEPTION WHEN SQLSTATE 'FG000' THEN
        NULL;
    END;
    -- a day already full refuses without locking anything (no queue behind a full limit)
    IF (SELECT coalesce(sum(used), 0) FROM limit_usage
         WHERE scope = p_scope AND business_day = p_day) + p_amount > p_cap THEN
        RETURN -1;
    END IF;
    BEGIN
        IF fg_limit_rebalance(p_scope, p_day, p_bucket, p_amount, p_cap, p_buckets, false) THEN
            RETURN p_bucket;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FG000';
    EXCEPTION WHEN SQLSTATE 'FG000' THEN
        RETURN -1;
    END;
END $$;


-- One intake in one statement (one round trip, one short transaction): answer a txn_no seen
-- before, check the payee against the whitelist, insert the disbursement unless its txn_no
-- exists (a concurrent duplicate waits here for the first one's commit), reserve the
-- platform's daily limit, then try the candidate funders in routing order (daily limit, and
-- the prefund for co-lending) and, for the first that has room, write the attempt, the
-- dispatch outbox row, the ledger posting with its voucher, the acceptance voucher and the
-- first response (with the row, or with the re-routing).
--
-- The caller computes everything per candidate beforehand (allocations, the response body,
-- the voucher texts), so the function only decides and writes. Returns one row:
--   ('created', disbursement id, index of the chosen candidate (1-based), NULL, NULL, NULL)
--   ('exists',  id, NULL, request_hash, first_response, NULL)   -- the txn_no was taken
--   ('not_whitelisted', NULL, ...)                            -- no such payee account
--   ('check_name', NULL, NULL, NULL, NULL, account_name_enc)  -- an account registered
--        before name_bidx existed: the caller compares the name and calls again with
--        p_name_checked
-- and raises SQLSTATE FG001 (the platform limit) or FG002 (every candidate refused; the
-- DETAIL is a JSON object funder id -> 'daily_limit' | 'prefund_insufficient'), rolling
-- everything back. The ledger voucher's text carries the placeholder "tx":-1 for the ledger
-- transaction id.
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
        fb := fg_limit_reserve('funder:' || p_funders[i], v_day, p_bucket, v_amount, p_caps[i],
                               p_buckets);
        IF fb < 0 THEN
            refused := refused || jsonb_build_object(p_funders[i], 'daily_limit');
            CONTINUE;
        END IF;
        IF p_alloc_platform[i] > 0 THEN
            UPDATE prefund SET balance = balance - p_alloc_platform[i], updated_at = now()
             WHERE funder_id = p_funders[i] AND balance >= p_alloc_platform[i];
            IF NOT FOUND THEN
                UPDATE limit_usage SET used = used - v_amount, share = share - v_amount
                 WHERE scope = 'funder:' || p_funders[i] AND business_day = v_day
                   AND bucket = fb;
                refused := refused || jsonb_build_object(p_funders[i], 'prefund_insufficient');
                CONTINUE;
            END IF;
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
