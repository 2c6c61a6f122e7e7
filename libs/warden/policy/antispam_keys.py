"""Where a homeserver's ``check_event_for_spam`` verdicts are stored.

A verdict asked for through ``/_warden/antispam/v1/check_event_for_spam`` is stored
under ``antispam:<community ID>:<event ID>``, never under the event ID itself: what a
homeserver's token gets judged must never become the verdict ``/sign`` gives another
community's room for the same event ID.
"""

from __future__ import annotations

PREFIX = "antispam:"


def antispam_verdict_key(community_id: str, event_id: str) -> str:
    """The key of the community's verdict on its homeserver's event ``event_id``."""
    return f"{PREFIX}{community_id}:{event_id}"


def event_id_of(verdict_key: str) -> str:
    """The Matrix event ID a verdict is about (the key itself for ordinary verdicts).

    Community IDs hold no ``:``, so the event ID is what follows the second one.
    """
    if not verdict_key.startswith(PREFIX):
        return verdict_key
    parts = verdict_key.split(":", 2)
    return parts[2] if len(parts) == 3 else verdict_key
