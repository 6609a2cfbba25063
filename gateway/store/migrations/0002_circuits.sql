-- Circuit breaker state per funder, shared by every gateway process: a process that opens a
-- funder's circuit makes it ineligible for intake everywhere until the cool-down ends.
CREATE TABLE funder_circuits (
    funder_id     text        PRIMARY KEY,
    state         text        NOT NULL,              -- closed | open | half_open
    failures      integer     NOT NULL DEFAULT 0,
    opened_at     timestamptz,
    open_until    timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
