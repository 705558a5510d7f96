DROP TABLE device_sessions;
DROP TABLE changes;
