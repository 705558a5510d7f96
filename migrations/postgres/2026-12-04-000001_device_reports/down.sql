DROP TABLE device_reports;
