-- A `session` change the journal writes in bulk carries the facts it records (acknowledged and
-- rejected versions, agent version, session holder, certificate) as JSON, read under the feed
-- lock at commit: every other replica takes them from the change instead of re-reading the
-- device, which cost a three-table join per device per replica in every fan-out. NULL where a
-- change carries none (the triggers' rows, and devices whose report changed): re-read as before.
ALTER TABLE changes ADD COLUMN facts TEXT;
