-- Nightly reconciliation: one run per (funder, statement day), the breaks it found, which
-- orders each statement listed, and the pool of orders not listed yet. Amounts are fen.

CREATE TABLE recon_runs (
    id            bigserial   PRIMARY KEY,
    funder_id     text        NOT NULL,
    business_day  date        NOT NULL,             -- the statement's day
    status        text        NOT NULL,             -- running | succeeded | failed
    trigger       text        NOT NULL,             -- scheduler | cli | demo | api | test
    runs          integer     NOT NULL DEFAULT 1,   -- how often this day was (re-)run
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    error         text,                             -- why it failed, with the line number
    lines         bigint      NOT NULL DEFAULT 0,
    amount        bigint      NOT NULL DEFAULT 0,
    summary       jsonb       NOT NULL DEFAULT '{}',
    UNIQUE (funder_id, business_day)                -- re-running a day updates its run
);
CREATE INDEX recon_runs_day ON recon_runs (business_day, funder_id);

CREATE TABLE recon_breaks (
    id            bigserial   PRIMARY KEY,
    run_id        bigint      NOT NULL REFERENCES recon_runs (id),
    funder_id     text        NOT NULL,
    business_day  date        NOT NULL,             -- the run's statement day
    order_no      text        NOT NULL,
    type          text        NOT NULL,
    status        text        NOT NULL,             -- open | auto_pending | auto_resolved | resolved
    severity      text        NOT NULL,
    reason        text        NOT NULL,
    attempt_id    bigint,
    txn_no        text,
    our_status    text,
    our_amount    bigint,
    bank_status   text,
    bank_amount   bigint,
    bank_ref      text,
    bank_lines    integer     NOT NULL DEFAULT 0,
    line_no       bigint,                           -- first statement line of the order
    resolution    text,                             -- auto | bank_is_right | gateway_is_right
    resolved_by   text,
    resolved_at   timestamptz,
    note          text,
    evidence      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, order_no, type)                 -- a re-run never duplicates a break
);
CREATE INDEX recon_breaks_open ON recon_breaks (status, funder_id, type);
CREATE INDEX recon_breaks_order ON recon_breaks (funder_id, order_no);

-- Which orders each statement listed: finds a repeat payout on a later day and sweeps the
-- pending pool. Kept for the window plus a week (older rows are pruned by each run). Its
-- primary key serves every look-up (by funder and day range); a second index on the order
-- number would double the cost of recording millions of lines a day.
CREATE TABLE recon_seen (
    funder_id     text        NOT NULL,
    business_day  date        NOT NULL,
    order_no      text        NOT NULL,
    lines         integer     NOT NULL,
    paid          integer     NOT NULL,             -- succeeded lines minus reversed lines
    amount        bigint      NOT NULL,
    PRIMARY KEY (funder_id, business_day, order_no)
);

-- Orders of day D that D's statement did not list: looked for in later statements for
-- `window_days`. `seen_day` is the statement that finally listed one (NULL: not yet).
CREATE TABLE recon_pending (
    funder_id     text        NOT NULL,
    order_no      text        NOT NULL,
    attempt_id    bigint      NOT NULL,
    expected_day  date        NOT NULL,
    seen_day      date,
    PRIMARY KEY (funder_id, order_no)
);
CREATE INDEX recon_pending_day ON recon_pending (funder_id, expected_day);

-- A funder's attempts by send time: the day's records and the window around it.
CREATE INDEX attempts_funder_created ON attempts (funder_id, created_at);
