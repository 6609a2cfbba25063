-- `recon_seen` (every order each statement listed, kept for the window plus a week) becomes
-- one partition per funder and statement day. A large funder's statement lists a million
-- orders a day: a run now loads its day into a fresh table and builds that table's index once,
-- instead of inserting a million entries one by one into an index of ten days; and the day
-- that falls out of the window is dropped as a table instead of deleted row by row.
--
-- Order numbers compare bytewise (COLLATE "C"), as in the run's temporary tables: the same
-- equality under every deterministic collation, and the sort and index build a plain memcmp
-- instead of a locale comparison. No query ranges over order numbers.

ALTER TABLE recon_seen RENAME TO recon_seen_unpartitioned;
ALTER INDEX recon_seen_pkey RENAME TO recon_seen_unpartitioned_pkey;

CREATE TABLE recon_seen (
    funder_id     text        NOT NULL,
    business_day  date        NOT NULL,
    order_no      text        COLLATE "C" NOT NULL,
    lines         integer     NOT NULL,
    paid          integer     NOT NULL,             -- succeeded lines minus reversed lines
    amount        bigint      NOT NULL,
    PRIMARY KEY (funder_id, business_day, order_no)
) PARTITION BY RANGE (funder_id, business_day);

-- The partition of (funder, day): a name of safe characters whatever the funder id, 52 long.
CREATE OR REPLACE FUNCTION recon_seen_partition(funder text, day date) RETURNS text
    LANGUAGE sql STABLE STRICT
    RETURN 'recon_seen_' || md5(funder) || '_' || to_char(day, 'YYYYMMDD');

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT funder_id, business_day FROM recon_seen_unpartitioned LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF recon_seen FOR VALUES FROM (%L, %L) TO (%L, %L)',
            recon_seen_partition(r.funder_id, r.business_day),
            r.funder_id, r.business_day, r.funder_id, r.business_day + 1);
    END LOOP;
END $$;

INSERT INTO recon_seen SELECT * FROM recon_seen_unpartitioned;
DROP TABLE recon_seen_unpartitioned;
