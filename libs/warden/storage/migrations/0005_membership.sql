-- Warden's own membership in rooms (joins and leaves over federation) and the rooms an
-- operator pre-approved for invites.

-- One row per room Warden joined or left through make_join/send_join or
-- make_leave/send_leave. `servers` are the resident servers to ask again (the one that
-- answered the join first); `event_id` is Warden's last membership event.
CREATE TABLE room_memberships (
    room_id      TEXT PRIMARY KEY,
    membership   TEXT NOT NULL CHECK (membership IN ('join', 'leave')),
    room_version TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    servers      TEXT[] NOT NULL DEFAULT '{}',
    updated_ts   BIGINT NOT NULL
);

-- Rooms whose invites Warden accepts, and the community each joins. Written by
-- POST /api/v1/rooms/{roomId}/approve_invite; kept after the join (so a re-invite after
-- a kick works) and removed by DELETE on the same path or by leaving through the API.
CREATE TABLE invite_approvals (
    room_id      TEXT PRIMARY KEY,
    community_id TEXT NOT NULL REFERENCES communities (id) ON DELETE CASCADE,
    created_ts   BIGINT NOT NULL
);
