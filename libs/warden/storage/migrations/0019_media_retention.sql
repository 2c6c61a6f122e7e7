-- Retention of media scan results (PS_RETENTION_MEDIA_DAYS): each pruning batch finds
-- its old rows through these indexes instead of scanning the tables.
CREATE INDEX media_hashes_ts ON media_hashes (ts);
CREATE INDEX media_classifications_ts ON media_classifications (classified_ts);
