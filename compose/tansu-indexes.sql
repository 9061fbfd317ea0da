-- Indexes tansu 0.6's SQLite storage lacks. Without this one every fetched record scans
-- the whole header table, so consuming a backlog gets slower with every message ever
-- stored (minutes for a few thousand records). Applied by native-up.sh and the tests'
-- own brokers once the broker has created its schema; harmless when already present.
create index if not exists sluice_header_record on header (topition, offset_id);
