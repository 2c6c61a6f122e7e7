"""Sliding 60-second windows of event IDs in Redis, for the membership rate filters.

A window is a sorted set of event IDs scored by the time (ms) Warden first counted them
(``ZADD NX`` keeps the first score, so an event evaluated again, by any worker, counts
once). Adding, pruning, counting and renewing the expiry is one Lua script: atomic, and
one command, so it goes through ``FilterDeps.auto_pipeline`` with the other commands of
the events evaluated together.

An event that must not count (its sender is not verified: a forged event must not fill a
window) is only measured against the window (``add`` false).
"""

from __future__ import annotations

from warden.storage.redis_autopipeline import RedisAutoPipeline, Script

WINDOW_MS = 60_000
# The key outlives its newest entry by one window: a quiet window's key goes away.
EXPIRY_MS = WINDOW_MS * 2

# KEYS: the window; ARGV: the event ID, now (ms), the newest score to prune (now minus
# the window), the key's expiry (ms), "1" to add the event. Returns how many events the
# window holds now, this one included when it is (or was already) in it.
_COUNT = Script("""
if ARGV[5] == '1' then
  redis.call('zadd', KEYS[1], 'NX', ARGV[2], ARGV[1])
end
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[3])
local count = redis.call('zcard', KEYS[1])
if ARGV[5] == '1' then
  redis.call('pexpire', KEYS[1], ARGV[4])
elseif redis.call('zscore', KEYS[1], ARGV[1]) == false then
  count = count + 1
end
return count
""")


async def count_event(
    pipeline: RedisAutoPipeline, key: str, event_id: str, now_ms: int, *, add: bool = True
) -> int:
    """Events in the window at ``key`` over the last 60 s, ``event_id`` included.

    With ``add`` the event is recorded (once, however often it is counted); without, it
    is counted as if it were one more, and the window is left as it was (but pruned).
    """
    result = await pipeline.run_script(
        _COUNT,
        keys=[key],
        args=[event_id, now_ms, now_ms - WINDOW_MS, EXPIRY_MS, "1" if add else "0"],
    )
    return int(result)
