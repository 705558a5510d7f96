-- Same schema as PostgreSQL; SQLite (one process) never writes to the feed.
ALTER TABLE changes ADD COLUMN facts TEXT;
