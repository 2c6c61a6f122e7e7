"""Policyserv's verdict cache (``events``) read as Warden verdicts.

Policyserv stored, per event ID, ``is_probably_spam`` and ``confidence_vectors``: a JSON
object written in three generations:

* current: ``"h:<harm ID>": 1.0`` per harm, and ``"Allowed": 1.0`` for the allowed class;
* v1.x confidence vectors: ``"org.matrix.policyserv.vec.<name>": <0..1>``, where the
  stored boolean was the decision (``spam >= PS_SPAM_THRESHOLD`` at the time);
* migration 05's conversion of ``reasons_csv``: ``"<reason>": 1.0`` for free-text reasons.

The decision is policyserv's own rule: a harm, or ``is_probably_spam``, refuses; a
refusal without a harm carries ``org.matrix.msc4456.other`` (what policyserv answers for
it). Only the current encoding carries harm IDs; the legacy keys are reasons, not
harms, and are kept in the verdict's filter outcome for the record.

Warden binds each verdict to the event's content through its reference hash. From
room version 3 the event ID *is* that hash, so it is recovered from the ID. A room v1/v2
event ID (``$opaque:server``) says nothing about the content, and policyserv kept no
hash. Such a *refusal* is imported unbound (no reference hash): the filter workers bind
it to the first event asked about under that ID, and from then on another event under
the ID is a reused event ID. At worst that refuses an event someone crafted under an ID
policyserv refused. An allowed (or neutral) verdict bound that way could sign spam sent
under its ID first, so those are not imported: the event is judged afresh, which can
only make the answer stricter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from unpaddedbase64 import decode_base64, encode_base64

from warden.policy.harms import OTHER
from warden.policy.verdict import ContentClass

HARM_PREFIX = "h:"
ALLOWED_KEY = "Allowed"
LEGACY_VECTOR_PREFIX = "org.matrix.policyserv.vec."

# Room v3 IDs use standard base64, v4+ the URL-safe alphabet: 43 characters, 32 bytes.
_HASH_EVENT_ID = re.compile(r"\$(?:[A-Za-z0-9+/]{43}|[A-Za-z0-9_-]{43})")
# What Warden accepts as a harm ID (policyserv never validated templates' output).
_HARM_ID = re.compile(r"[A-Za-z0-9._-]{1,255}")
MAX_REASONS = 32


# Room v1/v2 event IDs are "$" + opaque local part + ":" + server name.
_V1_V2_EVENT_ID = re.compile(r"\$[^:\s]+:\S+")
MAX_EVENT_ID_BYTES = 255  # as Warden's PDU checks
SKIP_V1_V2_NOT_REFUSED = (
    "room v1/v2 event ID not refused by policyserv: its ID does not name the content and "
    "policyserv kept no content hash, and an allowed verdict bound to whatever is asked "
    "about first could sign spam under that ID; the event is judged afresh if asked again"
)


class Unimportable(ValueError):
    """A row that cannot become a Warden verdict; the message says why."""


@dataclass(frozen=True)
class ImportedVerdict:
    """The verdict of one policyserv ``events`` row."""

    event_id: str
    content_class: ContentClass
    harms: tuple[str, ...]
    # None: a room v1/v2 refusal, bound to the content first asked about (see above).
    reference_hash: str | None
    encoding: str  # "harms", "legacy_vectors", "legacy_reasons" or "empty"
    reasons: tuple[str, ...]  # legacy keys, kept for the record

    @property
    def prohibited(self) -> bool:
        """True when the event is refused."""
        return self.content_class is ContentClass.PROHIBITED


def reference_hash_of(event_id: str) -> str:
    """The reference hash (unpadded standard base64) a room v3+ event ID encodes.

    Raises ``Unimportable`` for any other ID.
    """
    if ":" in event_id and event_id.startswith("$"):
        raise Unimportable(
            "room v1/v2 event ID: it does not name the event's content and policyserv kept "
            "no content hash, so Warden cannot bind the verdict; the event is judged afresh "
            "if asked again"
        )
    if not _HASH_EVENT_ID.fullmatch(event_id):
        raise Unimportable("not an event ID")
    raw = event_id[1:].replace("-", "+").replace("_", "/")
    digest = decode_base64(raw)
    if len(digest) != 32:  # pragma: no cover - 43 base64 characters are 32 bytes
        raise Unimportable("not an event ID")
    return encode_base64(digest)


def is_room_v1_v2_event_id(event_id: str) -> bool:
    """Whether ``event_id`` has the room v1/v2 form ``$local:server`` (bounded)."""
    return (
        len(event_id.encode("utf-8")) <= MAX_EVENT_ID_BYTES
        and _V1_V2_EVENT_ID.fullmatch(event_id) is not None
    )


def _vectors(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Unimportable("confidence_vectors is not JSON") from None
    if not isinstance(data, dict):
        raise Unimportable("confidence_vectors is not a JSON object")
    return data


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def decode_event(
    event_id: str, is_probably_spam: bool, confidence_vectors: str | None
) -> ImportedVerdict:
    """Policyserv's verdict for one ``events`` row. Raises ``Unimportable``.

    A room v1/v2 event ID gives a verdict without a reference hash if it is a refusal,
    and raises ``Unimportable`` otherwise.
    """
    v1_v2 = is_room_v1_v2_event_id(event_id)
    reference_hash = None if v1_v2 else reference_hash_of(event_id)
    vectors = _vectors(confidence_vectors)
    harms: set[str] = set()
    reasons: list[str] = []
    allowed = current = legacy_vectors = False
    for key, value in vectors.items():
        if key.startswith(HARM_PREFIX):
            current = True
            harm = key[len(HARM_PREFIX) :]
            if not _HARM_ID.fullmatch(harm):
                raise Unimportable(f"harm ID {harm[:64]!r} is not a valid identifier")
            if _positive(value):
                harms.add(harm)
        elif key == ALLOWED_KEY:
            current = True
            allowed = _positive(value)
        else:
            legacy_vectors = legacy_vectors or key.startswith(LEGACY_VECTOR_PREFIX)
            if len(reasons) < MAX_REASONS:
                reasons.append(f"{key[:128]}={value}")
    if current:
        encoding = "harms"
    elif legacy_vectors:
        encoding = "legacy_vectors"
    else:
        encoding = "legacy_reasons" if reasons else "empty"
    if harms or is_probably_spam:
        content_class = ContentClass.PROHIBITED
        harm_ids = tuple(sorted(harms)) or (OTHER,)
    else:
        content_class = ContentClass.ALLOWED if allowed else ContentClass.NEUTRAL
        harm_ids = ()
        if v1_v2:
            raise Unimportable(SKIP_V1_V2_NOT_REFUSED)
    return ImportedVerdict(
        event_id=event_id,
        content_class=content_class,
        harms=harm_ids,
        reference_hash=reference_hash,
        encoding=encoding,
        reasons=tuple(reasons),
    )
