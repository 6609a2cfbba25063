-- Vouchers are written unsealed in the transaction of the change they record; one sealer at a
-- time (advisory lock) numbers them and links them into a single hash chain, in batches, so
-- no hot chain-head row serialises intake.
ALTER TABLE voucher_events
    ADD COLUMN seq       bigint UNIQUE,
    ADD COLUMN prev_hash text,
    ADD COLUMN hash      text,
    ADD COLUMN sealed_at timestamptz;
CREATE INDEX voucher_events_unsealed ON voucher_events (id) WHERE seq IS NULL;
