-- Nothing reads devices by owner but a fleet's deletion (one scan); every move of a device
-- between fleets paid for the index.
DROP INDEX devices_fleet;
