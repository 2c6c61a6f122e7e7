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


def server_keys_negative(server_name: str, key_id: str) -> str:
    """Marks a (server, key ID) whose lookup just failed to find a usable key.

    Value: a short text saying why (shown in the M_UNAUTHORIZED message). TTL:
    ``PS_KEY_NEGATIVE_CACHE_SECONDS`` for a definitive answer,
    ``PS_KEY_NEGATIVE_CACHE_TIMEOUT_SECONDS`` for a failure that may pass. While it
    exists no replica fetches for that key again, so requests signed with unknown keys
    cannot make us fetch on every request. Keyed by key ID too, so a made-up key ID does
    not mark the server's real keys. Server names hold no ``|``; key IDs may, and come
    last.
    """
    return f"{PREFIX}server_keys_negative:{server_name}|{key_id}"


def verdict(event_id: str) -> str:
    """``warden:verdict:<event_id>``: a given verdict as JSON (``Verdict.to_json``).

    Written by a filter worker after the verdict is durable in PostgreSQL (and answered);
    read by the workers, which answer a repeat from it (gateways ask the workers, not
    Redis). Expires after ``PS_VERDICT_CACHE_SECONDS`` (an hour by default;
    PostgreSQL keeps it for good), which bounds Redis' memory to about a kilobyte per new
    event in that time.
    """
    return f"{PREFIX}verdict:{event_id}"


def evaluation_claim(event_id: str) -> str:
    """``warden:claim:<event_id>``: held (SET NX with a TTL) by the one worker evaluating
    the event; others wait for ``verdict(event_id)`` instead of evaluating again."""
    return f"{PREFIX}claim:{event_id}"


def hellban(community_id: str, user_id: str) -> str:
    """``warden:hellban:<community>:<user>``: present while the user is hellbanned in the
    community. Set with NX and a TTL of the configured minutes, so a repeat offence while
    banned does not extend it."""
    return f"{PREFIX}hellban:{community_id}:{user_id}"


def frequency(filter_name: str, community_id: str, user_id: str) -> str:
    """``warden:freq:<filter>:<community>:<user>``: a sorted set of event IDs scored by
    time (ms) for a sliding-window rate; adding the same event ID twice counts once."""
    return f"{PREFIX}freq:{filter_name}:{community_id}:{user_id}"


def rate_limit(origin: str, window: int, budget: str = "sign") -> str:
    """``warden:rl:<origin>:<window>``: requests from one origin server in one window of
    the per-origin rate limit, shared by every gateway replica.

    Other budgets have their own prefix, ``warden:rl_<budget>:<origin>:<window>``:
    ``sign_others`` (policy requests about other servers' events that needed a
    verdict), ``send`` (``/send``: PDUs plus one per transaction),
    ``community_api`` (the server-centric API; the "origin" is the community ID, never
    its token) and ``antispam`` (the spam-checker callbacks, by community ID). The window
    is a number and comes last, so a key names one origin whatever ``:`` it holds.
    """
    if budget == "sign":
        return f"{PREFIX}rl:{origin}:{window}"
    return f"{PREFIX}rl_{budget}:{origin}:{window}"


def transaction(origin: str, txn_id: str) -> str:
    """``warden:txn:<len(origin)>:<origin>:<txn_id>``: a federation ``/send`` transaction
    already seen.

    Claimed with SET NX (value ``pending``, TTL 60 s) by the gateway that handles it,
    then replaced by the JSON answer given (TTL 10 minutes), which a repeat of the same
    transaction ID from the same origin gets again without being processed. Server
    names may hold ``:`` (a port) and transaction IDs anything, so the origin is
    length-prefixed: ``example.org`` with ``8448:a`` and ``example.org:8448`` with ``a``
    are different keys. The gateway caps transaction IDs at 255 bytes.
    """
    return f"{PREFIX}txn:{len(origin)}:{origin}:{txn_id}"


def state_refresh_lock() -> str:
    """``warden:lock:state_refresh``: held (SET NX with a TTL, renewed while working) by
    the one filter worker refreshing rooms' state from ``PS_TRUSTED_ORIGINS``."""
    return f"{PREFIX}lock:state_refresh"


def retention_lock() -> str:
    """``warden:lock:retention``: held (SET NX with a TTL, renewed after each batch,
    deleted at the end; the value is the holder's random token) by the one process
    pruning old rows (``warden.retention``: a filter worker or ``warden prune``)."""
    return f"{PREFIX}lock:retention"


def retention_last_run() -> str:
    """``warden:retention:last_run``: when the last complete pruning pass ended (Unix
    ms, no TTL); filter workers prune when it is ``PS_RETENTION_INTERVAL_MINUTES`` old."""
    return f"{PREFIX}retention:last_run"


def startup_join_lock() -> str:
    """``warden:lock:startup_joins``: held (SET NX with a 60 s TTL, refreshed while
    working) by the one gateway replica joining ``PS_JOIN_ROOM_IDS``; the value is that
    replica's random token, so only the holder refreshes or releases it. Others wait and
    take over if the holder dies (the TTL runs out)."""
    return f"{PREFIX}lock:startup_joins"


def join_rate(room_id: str) -> str:
    """``warden:joins:<room_id>``: the join-rate window of one room, shared by every
    worker. A sorted set of join event IDs scored by the time (ms) Warden first counted
    them (``ZADD NX``: a re-evaluated event counts once); entries older than 60 s are
    pruned on each count. TTL: 120 s, renewed by each count, so a quiet room's key goes."""
    return f"{PREFIX}joins:{room_id}"


def invite_rate(community_id: str, user_id: str) -> str:
    """``warden:invites:<community>:<user>``: the invite-rate window of one sender in one
    community, shared by every worker; a sorted set like ``join_rate`` (event IDs scored
    by first-count time in ms, pruned past 60 s). TTL: 120 s, renewed by each count."""
    return f"{PREFIX}invites:{community_id}:{user_id}"


def frequency_counts(filter_name: str, community_id: str, user_id: str) -> str:
    """``warden:freqn:<filter>:<community>:<user>``: a hash beside the ``frequency``
    window of the same filter, community and user for a window that counts more than
    one per event (mentions): event ID → the number that event added, plus ``#total``,
    their sum. An event ID starts with ``$``, so it never collides with ``#total``.
    Entries leave with the window's members; the TTL is the window's (two windows)."""
    return f"{PREFIX}freqn:{filter_name}:{community_id}:{user_id}"


def unsafe_signing_key(server_name: str, key_id: str) -> str:
    """``warden:unsafe_key:<server>/<key_id>``: the server's own key document (fetched
    and verified by the keyring) publishes the publicly known compromised key under this
    key ID. Value ``1``; TTL ``UNSAFE_KEY_MARK_SECONDS`` (7 days), set again on each
    fetch that still finds it. Read by the unsafe signing key filter. One per (server,
    key ID) whose document really holds that key, so an outsider grows it only by
    serving such documents, and each one expires."""
    return f"{PREFIX}unsafe_key:{server_name}/{key_id}"


UNSAFE_KEY_MARK_SECONDS = 7 * 24 * 3600


def muninn_poll_lock() -> str:
    """``warden:lock:muninn_poll``: taken (SET NX) by the one filter worker polling the
    Muninn Hall member directory, then left to expire 50 to 70 minutes after the poll (5
    minutes after a failed one): while it exists no worker polls. Value: the holder's
    random token."""
    return f"{PREFIX}lock:muninn_poll"


def media_scan_claim(mxc_uri: str) -> str:
    """Held by the replica downloading and hashing one piece of media (HMA filter).

    Value: a random token of the holder. TTL: ``PS_HMA_TIMEOUT_SECONDS``, so a crashed
    holder's claim lapses. Others wait for the result to appear in PostgreSQL
    (``media_hashes``) instead of downloading the same media again.
    """
    return f"{PREFIX}media_scan_claim:{mxc_uri}"


def media_scan_failed(mxc_uri: str) -> str:
    """Marks media whose download or hashing just failed (HMA filter).

    Value: a short text saying why. TTL: ``PS_HMA_FAILURE_CACHE_SECONDS``. While it
    exists no replica downloads the media again: asks answer "no verdict" at once, so
    an event whose media keeps failing (gone, broken, its host down) costs one download
    per TTL however often its senders retry. Nothing final is stored from a failure.
    """
    return f"{PREFIX}media_scan_failed:{mxc_uri}"
