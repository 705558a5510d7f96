-- Page fill is a PostgreSQL storage setting; SQLite serves one process and has none.
SELECT 1;
