-- Media scan results and trust data, in policyserv's shape, so that `warden
-- import-policyserv` carries them over and media scanning (HMA, OpenAI) and the
-- untrusted-media filter start from what policyserv already knew.

-- One scan result per (media, community): a community's banks decide what a hit means.
CREATE TABLE media_classifications (
    mxc_uri TEXT NOT NULL,
    community_id TEXT NOT NULL REFERENCES communities (id) ON DELETE CASCADE,
    class SMALLINT NOT NULL,            -- warden.policy.verdict.ContentClass
    harms TEXT[] NOT NULL DEFAULT '{}',
    source TEXT NOT NULL,               -- 'policyserv_import', or the scanner that decided
    classified_ts BIGINT NOT NULL,      -- ms
    PRIMARY KEY (mxc_uri, community_id)
);

-- Data of trust sources that do not come from room state (e.g. a Muninn Hall member
-- directory). Creators and power levels are never stored here: Warden derives them
-- from the room state it verified.
CREATE TABLE trust_data (
    source_name TEXT NOT NULL,
    key TEXT NOT NULL,
    data JSONB NOT NULL,
    updated_ts BIGINT NOT NULL,         -- ms
    PRIMARY KEY (source_name, key)
);
