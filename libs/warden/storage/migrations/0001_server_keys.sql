-- Remote servers' verify keys, as fetched directly or through the notary.
-- The keyring reads Redis first, then this table; both honour valid_until_ts.
CREATE TABLE server_keys (
    server_name      TEXT    NOT NULL,
    key_id           TEXT    NOT NULL,
    verify_key       TEXT    NOT NULL,  -- unpadded base64
    valid_until_ts   BIGINT  NOT NULL,  -- ms; for old_verify_keys, their expired_ts
    expired          BOOLEAN NOT NULL DEFAULT FALSE,  -- from old_verify_keys
    fetched_from     TEXT    NOT NULL,  -- 'direct' or the notary's server name
    fetched_at_ts    BIGINT  NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
