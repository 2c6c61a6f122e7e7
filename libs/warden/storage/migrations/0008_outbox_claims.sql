-- A lease on an unpublished verdict, taken by the outbox sweeper that publishes it
-- (security review L12). The sweeper claims a batch in one short statement and publishes
-- outside any transaction, so no row lock or pooled connection is held across slow
-- publishes; other sweepers skip rows whose lease (ms) has not lapsed.
ALTER TABLE verdicts ADD COLUMN outbox_claimed_until BIGINT NOT NULL DEFAULT 0;
