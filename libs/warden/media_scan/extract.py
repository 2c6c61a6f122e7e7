"""Which media of an event are scanned: ``content.url`` and ``content.info.thumbnail_url``.

Only plain ``mxc://`` URIs are taken. Encrypted media (``content.file`` and
``content.info.thumbnail_file``) are skipped: their bytes are ciphertext, which no hash
bank can match, and the key is for the room's members, not for Warden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from warden.federation.xmatrix import is_valid_server_name

# Event types, and m.room.message msgtypes, whose media are scanned (policyserv's).
SCANNED_EVENT_TYPES = frozenset({"m.sticker"})
SCANNED_MSGTYPES = frozenset({"m.image", "m.video"})

# The spec's media ID grammar: what the media repository would accept in a path.
_MEDIA_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")


@dataclass(frozen=True)
class MediaRef:
    """One piece of media: ``mxc://<server_name>/<media_id>``."""

    server_name: str
    media_id: str

    @property
    def uri(self) -> str:
        """The mxc URI, as the caches key it."""
        return f"mxc://{self.server_name}/{self.media_id}"


def parse_mxc(value: object) -> MediaRef | None:
    """The media an ``mxc://`` URI names, or None for anything else (http URLs, junk)."""
    if not isinstance(value, str) or not value.startswith("mxc://"):
        return None
    server_name, sep, media_id = value[len("mxc://") :].partition("/")
    if not sep or not is_valid_server_name(server_name) or not _MEDIA_ID.fullmatch(media_id):
        return None
    return MediaRef(server_name, media_id)


def is_scanned_event(event_type: str, content: dict[str, Any]) -> bool:
    """True for stickers, and for messages whose msgtype is an image or a video."""
    if event_type in SCANNED_EVENT_TYPES:
        return True
    return event_type == "m.room.message" and content.get("msgtype") in SCANNED_MSGTYPES


def media_refs(event_type: str, content: dict[str, Any]) -> list[MediaRef]:
    """The distinct unencrypted media of a scanned event (the media, then its thumbnail)."""
    if not is_scanned_event(event_type, content):
        return []
    candidates: list[object] = [content.get("url")]
    info = content.get("info")
    if isinstance(info, dict):
        candidates.append(info.get("thumbnail_url"))
    refs: list[MediaRef] = []
    for candidate in candidates:
        ref = parse_mxc(candidate)
        if ref is not None and ref not in refs:
            refs.append(ref)
    return refs
