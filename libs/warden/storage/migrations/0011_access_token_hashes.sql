-- Community access tokens are stored only as a hash: the hex SHA-256 of the token's
-- UTF-8 bytes. Tokens carry at least 128 bits of randomness (Warden's: 256), so an
-- unsalted hash cannot be reversed, and a lookup stays one indexed equality.
ALTER TABLE communities ADD COLUMN api_access_token_hash TEXT;
UPDATE communities
    SET api_access_token_hash = encode(sha256(convert_to(api_access_token, 'UTF8')), 'hex')
    WHERE api_access_token IS NOT NULL;
DROP INDEX communities_api_access_token;
ALTER TABLE communities DROP COLUMN api_access_token;
CREATE UNIQUE INDEX communities_api_access_token_hash ON communities (api_access_token_hash)
    WHERE api_access_token_hash IS NOT NULL;
