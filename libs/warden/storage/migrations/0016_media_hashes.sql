-- HMA media scanning: what one download and hash of a piece of media found, shared by
-- every community and replica, so each mxc is downloaded and hashed once. Which banks
-- count is decided per community and kept in media_classifications (0013).
CREATE TABLE media_hashes (
    mxc_uri TEXT PRIMARY KEY,
    -- {"content_type": <sniffed MIME type or "">, "bytes": <size>,
    --  "hashes": {<signal type>: <hash>}, "banks": [<bank names any hash matched>]}
    hashes JSONB NOT NULL,
    ts BIGINT NOT NULL                  -- ms, when it was hashed and looked up
);
