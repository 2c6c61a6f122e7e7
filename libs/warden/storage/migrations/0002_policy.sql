-- Communities, protected rooms, verdicts and learned display names.

CREATE TABLE communities (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    -- Overrides of the instance defaults; absent keys inherit (unset is not false).
    config              JSONB NOT NULL DEFAULT '{}'::jsonb,
    api_access_token    TEXT,
    can_self_join_rooms BOOLEAN NOT NULL DEFAULT FALSE,
    created_ts          BIGINT NOT NULL DEFAULT (extract(epoch from now()) * 1000)::bigint
);
CREATE UNIQUE INDEX communities_api_access_token ON communities (api_access_token)
    WHERE api_access_token IS NOT NULL;
INSERT INTO communities (id, name) VALUES ('default', 'Default community');

CREATE TABLE rooms (
    room_id              TEXT PRIMARY KEY,
    room_version         TEXT NOT NULL,
    community_id         TEXT NOT NULL REFERENCES communities (id),
    moderator_user_id    TEXT NOT NULL DEFAULT '',
    last_state_update_ts BIGINT NOT NULL DEFAULT 0,
    created_ts           BIGINT NOT NULL DEFAULT (extract(epoch from now()) * 1000)::bigint
);
CREATE INDEX rooms_community ON rooms (community_id);

-- One row per event ID, written once (INSERT ... ON CONFLICT DO NOTHING): the verdict
-- never changes. reference_hash binds the verdict to the event's redacted form, so a
-- room v1/v2 event ID reused for other content cannot inherit a verdict.
CREATE TABLE verdicts (
    event_id        TEXT PRIMARY KEY,
    room_id         TEXT NOT NULL,
    community_id    TEXT NOT NULL,
    reference_hash  TEXT NOT NULL,
    class           SMALLINT NOT NULL,  -- 0 neutral, 1 allowed, 2 prohibited
    harms           TEXT[] NOT NULL DEFAULT '{}',
    filters         JSONB NOT NULL DEFAULT '[]'::jsonb,
    sender          TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    origin          TEXT NOT NULL,
    first_seen_ts   BIGINT NOT NULL
);
CREATE INDEX verdicts_room_ts ON verdicts (room_id, first_seen_ts);

-- Joined members' display names per room, for the mentions filter (filled by state
-- learning).
CREATE TABLE displaynames (
    room_id     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    displayname TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
