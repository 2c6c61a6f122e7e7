-- The verdicts table doubles as the outbox of verdict messages to JetStream: a worker
-- that crashes between committing a verdict and publishing it leaves the row
-- unpublished, and any worker's sweeper publishes it later. Rows from before this
-- migration count as published.
ALTER TABLE verdicts ADD COLUMN published BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE verdicts ALTER COLUMN published SET DEFAULT FALSE;
-- The message's extra fields (source, body excerpt) until it is published; cleared then,
-- so no content stays in the database.
ALTER TABLE verdicts ADD COLUMN outbox_extra JSONB;
CREATE INDEX verdicts_unpublished ON verdicts (first_seen_ts) WHERE NOT published;
