DROP INDEX certificates_device_key;
DROP TABLE certificate_audit;
