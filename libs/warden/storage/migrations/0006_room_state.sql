-- Room state learned from federation: from /send transactions (the room-state consumer
-- in the filter workers), from a send_join response (seed), and from GET /state of a
-- trusted origin (the periodic refresh). Not authoritative: no state resolution; the
-- event with the greater depth wins, and the periodic refresh corrects drift.
-- Members and display names live in the displaynames table (0002).

-- One row per room with what is not a state event of its own.
CREATE TABLE room_state (
    room_id           TEXT PRIMARY KEY,
    -- Warden's own user's last learned membership ('join', 'leave', 'ban', ...);
    -- NULL when never seen. 'leave' or 'ban' by someone else means Warden was removed.
    warden_membership TEXT,
    warden_removed_by TEXT,
    -- A recent event of the room, the anchor of GET /state?event_id= for the refresh.
    last_event_id     TEXT,
    last_refresh_ts   BIGINT NOT NULL DEFAULT 0,
    updated_ts        BIGINT NOT NULL DEFAULT 0
);

-- The current learned state events Warden cares about: m.room.create,
-- m.room.power_levels, m.room.server_acl, m.room.policy and moderation policy rules
-- (m.policy.rule.* and their legacy types). A rule whose content was emptied is kept
-- with that content: it is the current state (the rule is gone), and keeping it stops
-- an older copy of the rule, delivered late, from coming back.
CREATE TABLE room_state_events (
    room_id    TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key  TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    sender     TEXT NOT NULL,
    depth      BIGINT NOT NULL,
    content    JSONB NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);
