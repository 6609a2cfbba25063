-- The automatic resolutions read a run's breaks awaiting them a chunk at a time, in id order
-- from the last one read. The only index naming their status (`recon_breaks_open`, by status,
-- funder and type) made every chunk read all the breaks still waiting and sort them: a
-- quadratic read when a bank outage leaves a day of orders unknown. This index holds the
-- waiting breaks alone, in the order the chunks walk them; a break leaves it when resolved,
-- so it is empty between runs.

CREATE INDEX recon_breaks_auto_pending ON recon_breaks (run_id, id) WHERE status = 'auto_pending';
