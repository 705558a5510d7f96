-- The change feed's triggers exist on PostgreSQL only (replicas); SQLite serves one process.
SELECT 1;
