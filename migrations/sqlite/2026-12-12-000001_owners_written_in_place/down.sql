CREATE INDEX devices_fleet ON devices (fleet);
