-- A break is looked up by its order number for one type only: whether an order's
-- `missing_at_bank` was reported by another run, and which open ones a late statement line
-- closes. The index on (funder_id, order_no) over every break becomes one over those breaks:
-- a run that finds 70,000 breaks of other types no longer inserts each into it (a fifth to a
-- quarter of writing a night's breaks).

DROP INDEX recon_breaks_order;
CREATE INDEX recon_breaks_missing ON recon_breaks (funder_id, order_no)
    WHERE type = 'missing_at_bank';
