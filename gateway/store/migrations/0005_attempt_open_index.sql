-- In-flight counts (/v1/funders, housekeeping every few seconds) read only open attempts;
-- without this they scan every attempt ever made.
CREATE INDEX attempts_open ON attempts (funder_id, status)
    WHERE status IN ('accepted', 'sent', 'processing', 'unknown');
