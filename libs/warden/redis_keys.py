"""Every Redis key Warden uses, declared in one place.

All keys start with ``warden:`` so an operator can share a Redis with other software
and find ours with ``SCAN MATCH warden:*``. Values and TTLs are described next to each
key builder.
"""

from __future__ import annotations

PREFIX = "warden:"


def server_key(server_name: str, key_id: str) -> str:
    """A remote server's verify key, as the keyring cached it.

    Value: JSON ``{"key": <unpadded base64>, "valid_until_ts": <ms>, "expired": <bool>}``.
    TTL: until ``valid_until_ts`` (already capped at seven days by the keyring); keys
    that are no longer valid are not kept here, only in PostgreSQL. ``/`` separates the
    parts because it can occur in neither a server name nor a key ID.
    """
    return f"{PREFIX}server_key:{server_name}/{key_id}"


def server_keys_negative(server_name: str) -> str:
    """Marks a server whose keys were just fetched without finding the key asked for.

    Value: a short text saying why (shown in the M_UNAUTHORIZED message). TTL:
    ``PS_KEY_NEGATIVE_CACHE_SECONDS``. While it exists no replica fetches that server's
    keys again, so requests signed with unknown keys cannot make us fetch on every
    request.
    """
    return f"{PREFIX}server_keys_negative:{server_name}"
