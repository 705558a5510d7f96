ALTER TABLE devices RESET (fillfactor);
