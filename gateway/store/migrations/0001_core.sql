-- The disbursement path: whitelist, disbursements, attempts, limits, prefund, outbox, vouchers.
-- Amounts are bigint fen. Every state change happens in one transaction with its limit
-- movement, outbox row and voucher event.

CREATE TABLE borrower_accounts (
    borrower_id   text        NOT NULL,
    account_no    text        NOT NULL,
    account_name  text        NOT NULL,
    bank_code     text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (borrower_id, account_no)
);

CREATE TABLE disbursements (
    id            bigserial   PRIMARY KEY,
    txn_no        text        NOT NULL UNIQUE,      -- 交易流水号: the idempotency key
    request_hash  bytea       NOT NULL,             -- sha256 of the canonical request
    client        text        NOT NULL,
    loan_id       text        NOT NULL,
    borrower_id   text        NOT NULL,
    amount        bigint      NOT NULL CHECK (amount > 0),
    currency      text        NOT NULL,
    term_unit     text        NOT NULL,
    term_count    integer     NOT NULL,
    apr           numeric(10, 6) NOT NULL,
    product       text        NOT NULL,
    repayment     text        NOT NULL,
    payee_account_no   text   NOT NULL,
    payee_account_name text   NOT NULL,
    payee_bank_code    text   NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    status        text        NOT NULL,
    funder_id     text        NOT NULL,
    mode          text        NOT NULL,
    alloc_funder  bigint      NOT NULL,
    alloc_platform bigint     NOT NULL,
    business_day  date        NOT NULL,
    failure       jsonb,
    first_response jsonb,                           -- replayed verbatim on an idempotent retry
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (alloc_funder + alloc_platform = amount)
);
CREATE INDEX disbursements_created ON disbursements (created_at DESC, id DESC);
CREATE INDEX disbursements_status ON disbursements (status, created_at DESC);
CREATE INDEX disbursements_funder ON disbursements (funder_id, created_at DESC);

CREATE TABLE attempts (
    id              bigserial   PRIMARY KEY,
    disbursement_id bigint      NOT NULL REFERENCES disbursements (id),
    n               integer     NOT NULL,
    funder_id       text        NOT NULL,
    order_no        text        NOT NULL UNIQUE,    -- the bank's idempotency key
    status          text        NOT NULL,
    mode            text        NOT NULL,
    alloc_funder    bigint      NOT NULL,
    alloc_platform  bigint      NOT NULL,
    bank_ref        text,
    error           jsonb,
    not_sent_count  integer     NOT NULL DEFAULT 0,
    query_count     integer     NOT NULL DEFAULT 0,
    next_query_at   timestamptz,                     -- poller schedule for processing/unknown
    unknown_since   timestamptz,
    escalated_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (disbursement_id, n)
);
CREATE INDEX attempts_poll ON attempts (next_query_at) WHERE next_query_at IS NOT NULL;

-- Daily usage per scope ('funder:<id>' or 'platform'), reserved with a conditional update.
CREATE TABLE limit_usage (
    scope         text        NOT NULL,
    business_day  date        NOT NULL,
    used          bigint      NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (scope, business_day)
);

-- The platform's co-lending prefund (存管) at each funder.
CREATE TABLE prefund (
    funder_id     text        PRIMARY KEY,
    balance       bigint      NOT NULL CHECK (balance >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Durable work: 'dispatch' (send an attempt to its bank) and 'webhook' (tell the lending core).
CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    kind          text        NOT NULL,
    ref_id        bigint      NOT NULL,
    funder_id     text,
    payload       jsonb,
    tries         integer     NOT NULL DEFAULT 0,
    available_at  timestamptz NOT NULL DEFAULT now(),
    leased_until  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_ready ON outbox (kind, available_at, id);

-- Nonces of accepted bank callbacks; a reused nonce is refused.
CREATE TABLE callback_nonces (
    funder_id     text        NOT NULL,
    nonce         text        NOT NULL,
    seen_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (funder_id, nonce)
);

-- Voucher events, written in the transaction of the change they record.
CREATE TABLE voucher_events (
    id            bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind          text        NOT NULL,
    txn_no        text,
    event         text        NOT NULL               -- canonical JSON
);
CREATE INDEX voucher_events_txn ON voucher_events (txn_no) WHERE txn_no IS NOT NULL;
