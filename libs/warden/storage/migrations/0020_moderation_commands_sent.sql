-- Which commands a destination accepted: (destination, event ID), kept for the command
-- retention. The queue row of a command is deleted once its transaction is accepted, so
-- without this a verdict message delivered again after that (its acknowledgement was
-- lost: NATS restarted, the moderator died) queued the command again and the bot
-- received it twice, in another transaction.
CREATE TABLE moderation_commands_sent (
    destination TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    sent_ts     BIGINT NOT NULL,  -- ms; dropped after the retention
    PRIMARY KEY (destination, event_id)
);
CREATE INDEX moderation_commands_sent_ts ON moderation_commands_sent (sent_ts);
