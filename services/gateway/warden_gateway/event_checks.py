"""What the event-level checks of ``/sign`` established, remembered per request body.

During a spam wave every server in a room asks for the same event within a second or
so: the same PDU bytes, each time with a different origin's X-Matrix signature. The
event-level work (parse, PDU structure, content hash, redaction, reference hash and
event ID, the sender's signature) gives the same answer for the same bytes, so it is
done once per body and remembered here, keyed by the SHA-256 of the body. The
request-level checks still run for every request: the X-Matrix signature (over the
remembered canonical bytes), the rate limit, and whether the room is still protected
with the same room version.

Only bodies that passed every event-level check are remembered; a body that failed is
checked again each time (an attacker repeating a bad body pays for its own parsing).

The cache is bounded in entries and in bytes (``PS_EVENT_CHECK_CACHE_MAX_BYTES``, about
the canonical PDUs it holds plus a fixed overhead per entry): entries alone allowed
20 000 bodies of 64 KiB, 1.25 GiB, in a pod of 512 MiB. The bytes held are exported as
``warden_sign_event_check_cache_bytes``, set on insertion only (the miss path, which
already costs a signature check), so hits pay nothing more.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from warden_gateway.metrics import EVENT_CHECK_CACHE, EVENT_CHECK_CACHE_BYTES

DEFAULT_SIZE = 20_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# What an entry costs besides its bytes objects: the dict slot, the digest key, the
# tuple and its strings' headers (measured with sys.getsizeof, rounded up).
ENTRY_OVERHEAD_BYTES = 512

# Bound once: ``labels()`` takes a lock and builds a key on every call.
_HIT = EVENT_CHECK_CACHE.labels("hit")
_MISS = EVENT_CHECK_CACHE.labels("miss")


class CheckedEvent(NamedTuple):
    """A body that passed the event-level checks, and what they found."""

    content_json: bytes  # the PDU in canonical JSON: what X-Matrix signatures cover
    room_id: str
    room_version: str
    event_id: str
    reference_hash: str  # unpadded base64 of the redacted event's SHA-256
    policy_state: bool  # m.room.policy with an empty state key: signed without a verdict
    sender_server: str = ""  # the server part of the (signature-checked) sender
    # A signature by the sender's server verified (false only for a third-party invite
    # without one: then nothing is attributed to the sender).
    sender_signed: bool = True


_Entry = tuple[bytes, str, str, str, str, bool, str, bool]


class CheckedEvents:
    """A bounded LRU of ``CheckedEvent`` by body digest.

    Entries are kept as plain tuples of bytes, strings and a bool: the garbage collector
    stops tracking those (not instances of tuple subclasses), so thousands of entries add
    nothing to its full collections, which otherwise stall every request in flight.
    """

    def __init__(self, size: int = DEFAULT_SIZE, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def get(self, digest: bytes) -> CheckedEvent | None:
        """The entry for a body's digest, if remembered (counted as a hit or a miss)."""
        entry = self._entries.get(digest)
        if entry is None:
            _MISS.inc()
            return None
        self._entries.move_to_end(digest)
        _HIT.inc()
        return CheckedEvent._make(entry)

    @staticmethod
    def _cost(entry: _Entry) -> int:
        return ENTRY_OVERHEAD_BYTES + len(entry[0]) + sum(len(s) for s in entry[1:5])

    def put(self, digest: bytes, entry: CheckedEvent) -> None:
        """Remember a body that passed every event-level check."""
        if self._size <= 0:
            return
        value = (*entry,)
        cost = self._cost(value)
        if cost > self._max_bytes:
            return  # larger than the whole cache (or the cache is off)
        old = self._entries.pop(digest, None)
        if old is not None:
            self._bytes -= self._cost(old)
        self._entries[digest] = value
        self._bytes += cost
        while len(self._entries) > self._size or self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self._cost(evicted)
        EVENT_CHECK_CACHE_BYTES.set(self._bytes)

    @property
    def bytes_held(self) -> int:
        """Approximate bytes held (what the byte bound counts)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
