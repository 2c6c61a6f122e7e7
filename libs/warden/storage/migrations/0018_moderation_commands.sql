-- The outbound queue of to-device moderation commands (reference §2.3): signed
-- org.matrix.policyserv.command EDUs waiting for their destination (a moderation
-- bot's server), sent in federation transactions of up to 100 EDUs.

-- One row per destination: delivery state. A transaction's ID and its EDUs are stored
-- before it is sent, so every retry of it (after a failure or a restart) reuses both.
CREATE TABLE moderation_command_destinations (
    destination TEXT PRIMARY KEY,
    txn_id TEXT,                          -- the transaction in flight, NULL when none
    txn_edu_ids BIGINT[] NOT NULL DEFAULT '{}',
    last_txn_id TEXT NOT NULL DEFAULT '', -- the last transaction the destination accepted
    failures INTEGER NOT NULL DEFAULT 0,  -- consecutive failed attempts (backoff exponent)
    next_attempt_ts BIGINT NOT NULL DEFAULT 0,  -- ms; no attempt before this
    last_error TEXT NOT NULL DEFAULT '',
    last_success_ts BIGINT NOT NULL DEFAULT 0,  -- ms
    -- A sender claims the destination until claim_until (ms): one sender at a time
    -- across replicas; a crashed sender's claim simply runs out.
    claimed_by TEXT NOT NULL DEFAULT '',
    claim_until BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE moderation_command_edus (
    id BIGSERIAL PRIMARY KEY,
    destination TEXT NOT NULL
        REFERENCES moderation_command_destinations (destination) ON DELETE CASCADE,
    event_id TEXT NOT NULL,               -- the refused event the command names
    edu TEXT NOT NULL,                    -- the EDU's JSON, signed, exactly as sent
    created_ts BIGINT NOT NULL,           -- ms; dropped after the retention
    UNIQUE (destination, event_id)
);
-- Oldest first per destination (batches), and the retention sweep.
CREATE INDEX moderation_command_edus_destination ON moderation_command_edus (destination, id);
CREATE INDEX moderation_command_edus_created ON moderation_command_edus (created_ts);
