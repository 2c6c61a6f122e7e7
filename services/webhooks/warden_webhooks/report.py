"""The audit message for a refused event, in Hookshot's ``{"text", "html"}`` shape.

Like policyserv's report: who sent it, the room (with a matrix.to link), the event ID
and type, when it was first seen and when this report was made, the harms, and each
filter's outcome. Everything that came from the event or a remote server (user and room
IDs, event type, filter errors, the body excerpt) is HTML-escaped; the body excerpt
appears only in the HTML, folded inside ``<details>``.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from urllib.parse import quote

from warden.policy.antispam_keys import event_id_of
from warden.policy.verdict import Verdict

# An excerpt is for a moderator's glance, not a copy of the event.
MAX_EXCERPT_CHARS = 1000

UNVERIFIED_NOTE = "(named as sender, not verified: their server did not sign this event)"


def matrix_to(*ids: str) -> str:
    """A matrix.to permalink; each ID percent-encoded as the spec's examples do."""
    return "https://matrix.to/#/" + "/".join(quote(i, safe="!") for i in ids)


def _time(ms: int) -> str:
    if ms <= 0:
        return "unknown"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _filter_line(
    name: str, content_class: str, harms: tuple[str, ...], error: str | None, dry_run: bool
) -> str:
    line = f"{name}: {content_class}"
    if harms:
        line += f" ({', '.join(harms)})"
    if error:
        line += f" [error: {error}]"
    if dry_run:
        line += " [dry run: not counted]"
    return line


def build_report(verdict: Verdict, *, now_ms: int) -> dict[str, str]:
    """The webhook body for ``verdict``."""
    e = html.escape
    harms = ", ".join(verdict.harms) or "none"
    source = verdict.extra.get("source")
    asked = verdict.origin + (f" ({source})" if isinstance(source, str) and source else "")
    filters = [
        _filter_line(f.name, f.content_class.label, f.harms, f.error, f.dry_run)
        for f in verdict.filters
    ]
    # A sender nothing proved (an unsigned third-party invite) is not named as the
    # author: the event may be a forgery meant to get that user punished.
    user = verdict.sender if verdict.sender_verified else f"{verdict.sender} {UNVERIFIED_NOTE}"
    room_link = matrix_to(verdict.room_id)
    # A homeserver's check_event_for_spam verdict is keyed apart; link the event itself.
    event_link = matrix_to(verdict.room_id, event_id_of(verdict.event_id))

    text_lines = [
        f"Policy server refused an event ({harms})",
        f"User: {user}",
        f"Room: {verdict.room_id} ({room_link})",
        f"Event: {verdict.event_id} ({verdict.event_type})",
        f"First seen: {_time(verdict.first_seen_ts)}; reported: {_time(now_ms)}",
        f"Asked by: {asked}",
        "Filters:",
        *(f"- {line}" for line in filters),
    ]

    parts = [
        f"<p><strong>Policy server refused an event</strong> ({e(harms)})</p>",
        "<ul>",
        f"<li>User: <code>{e(verdict.sender)}</code>"
        + ("" if verdict.sender_verified else f" {e(UNVERIFIED_NOTE)}")
        + "</li>",
        f'<li>Room: <a href="{e(room_link)}">{e(verdict.room_id)}</a></li>',
        f'<li>Event: <a href="{e(event_link)}">{e(verdict.event_id)}</a>'
        f" (<code>{e(verdict.event_type)}</code>)</li>",
        f"<li>First seen: {_time(verdict.first_seen_ts)}; reported: {_time(now_ms)}</li>",
        f"<li>Asked by: {e(asked)}</li>",
        "</ul>",
        "<p>Filters:</p>",
        "<ul>",
        *(f"<li>{e(line)}</li>" for line in filters),
        "</ul>",
    ]
    excerpt = verdict.extra.get("body_excerpt")
    if isinstance(excerpt, str) and excerpt:
        parts.append(
            "<details><summary>Content excerpt</summary>"
            f"<pre>{e(excerpt[:MAX_EXCERPT_CHARS])}</pre></details>"
        )
    return {"text": "\n".join(text_lines), "html": "".join(parts)}
