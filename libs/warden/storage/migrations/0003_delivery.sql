-- What the moderator and webhooks services did with each prohibited verdict.
--
-- Both services consume JetStream at least once: a message may come back after a crash
-- between the side effect and the ack. These rows let them see that an event was
-- already handled (delivered, redacted, or given up on) and not act on it again.
-- status 'pending' means attempts were made and failed temporarily; more may follow.

CREATE TABLE webhook_deliveries (
    event_id     TEXT PRIMARY KEY,
    community_id TEXT NOT NULL,
    url_host     TEXT NOT NULL,  -- the host only: the URL's path may hold a secret
    status       TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT '',
    updated_ts   BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_status_ts ON webhook_deliveries (status, updated_ts);

CREATE TABLE moderation_actions (
    event_id          TEXT PRIMARY KEY,
    room_id           TEXT NOT NULL,
    action            TEXT NOT NULL,  -- 'redact'
    moderator_user_id TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT NOT NULL DEFAULT '',
    updated_ts        BIGINT NOT NULL
);
CREATE INDEX moderation_actions_status_ts ON moderation_actions (status, updated_ts);
