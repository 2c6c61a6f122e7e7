-- Learned state is authenticated (issue 10). The room-state consumer checks each PDU
-- received over /send against the auth rules as far as learned state allows, which
-- needs every user's membership (bans and invites too, not only the joined members of
-- displaynames) and which servers have a joined member (the /send origin rule).

-- One row per user whose membership is not 'leave' (a leave deletes the row).
CREATE TABLE room_members (
    room_id     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    server_name TEXT NOT NULL,
    membership  TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    -- The membership event's sender's server and depth (apply_event's ordering).
    sender      TEXT NOT NULL DEFAULT '',
    depth       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_joined_servers ON room_members (room_id, server_name)
    WHERE membership = 'join';

-- trusted_event_id: the anchor of the last snapshot Warden verified (seed or refresh),
-- which trusted servers know; the refresh falls back to it when last_event_id fails.
-- trusted_depth: the deepest state event of that snapshot; /send state events below it
-- are older than what Warden holds and are not learned (replays).
-- *_count: what the per-room caps (PS_ROOM_STATE_MAX_*) count.
ALTER TABLE room_state
    ADD COLUMN trusted_event_id TEXT,
    ADD COLUMN trusted_depth BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN member_count INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN displayname_count INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN rule_count INTEGER NOT NULL DEFAULT 0;

-- Rooms learned before this migration: their joined members come from displaynames, so
-- the /send origin rule works at once (the next refresh replaces them with a verified
-- snapshot, with bans, invites and the join rules). Display names whose user ID is not a
-- user ID were injected over /send (review H1) and are dropped.
DELETE FROM displaynames WHERE user_id NOT LIKE '@_%:_%';
INSERT INTO room_members (room_id, user_id, server_name, membership, event_id)
SELECT room_id, user_id, substr(user_id, strpos(user_id, ':') + 1), 'join', ''
FROM displaynames
ON CONFLICT DO NOTHING;
UPDATE room_state s SET
    member_count = (SELECT count(*) FROM room_members m WHERE m.room_id = s.room_id),
    displayname_count = (SELECT count(*) FROM displaynames d WHERE d.room_id = s.room_id),
    rule_count = (
        SELECT count(*) FROM room_state_events e
        WHERE e.room_id = s.room_id AND e.event_type NOT IN (
            'm.room.create', 'm.room.power_levels', 'm.room.server_acl', 'm.room.policy',
            'm.room.join_rules'
        )
    );
