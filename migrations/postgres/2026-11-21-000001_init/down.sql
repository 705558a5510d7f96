DROP TABLE certificates;
DROP TABLE enrollment_requests;
DROP TABLE devices;
