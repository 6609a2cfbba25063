-- `recon_seen`'s key leads with the order number. Within a partition (one funder, one
-- statement day) the funder and the day are the same on every row, so a key that starts with
-- them makes every comparison of the run's index build step over two equal columns first, and
-- the sort cannot use an abbreviated order number; with the order number first, building a
-- day's key of 4 million orders takes a fifth less time. Look-ups give the order number and
-- the funder, as before.

ALTER TABLE recon_seen
    DROP CONSTRAINT recon_seen_pkey,
    ADD PRIMARY KEY (order_no, funder_id, business_day);
