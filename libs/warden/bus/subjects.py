"""Every NATS subject, queue group, stream and consumer name Warden uses.

Declared once here; services import these names and never spell a subject themselves.

Evaluation (core NATS request/reply)
    ``EVALUATE_SUBJECT`` — the gateway asks for a verdict on one event. Served by the
    filter workers in queue group ``FILTER_WORKERS_QUEUE`` (each request reaches one
    worker). Body: the PDU as received (JSON bytes). Headers: ``HEADER_*`` below plus
    W3C ``traceparent``/``tracestate``. Reply: a verdict (``warden.policy.verdict``) as
    JSON, or ``{"error": "..."}`` when the worker could not judge.

Text checks (core NATS request/reply)
    ``CHECK_TEXT_SUBJECT`` — the gateway asks for a judgement of a text (the
    server-centric ``/_policyserv/v1/check/text``) by the community's text-capable
    filters. Served by the filter workers in ``FILTER_WORKERS_QUEUE``. Body: the text
    (UTF-8). Header ``HEADER_COMMUNITY``. Reply: ``{"harms": [...]}`` (empty: allowed)
    or ``{"error": "..."}``. Nothing is stored or published: a text is no event.

Homeserver spam checks (core NATS request/reply)
    ``ANTISPAM_CHECK_SUBJECT`` — the gateway's ``/_warden/antispam/v1`` asks for a
    judgement of an event it built from a homeserver's spam-checker callback (an
    invite, a join, a room creation, a login, a user name). Served by the filter
    workers in ``FILTER_WORKERS_QUEUE``. Body: the event (JSON). Headers
    ``HEADER_COMMUNITY``, ``HEADER_EVENT_ID`` (what rate windows count it by) and
    ``HEADER_ANTISPAM_KIND`` (``event``: every filter; ``username``: the user-ID and
    text filters; ``publish_room``: every filter, then the room's learned name and
    topic through the text filters). Reply: ``{"harms": [...]}`` (empty: allowed) or
    ``{"error": "..."}``. Nothing is stored or published (rate windows count it).

Verdicts (JetStream)
    One message per first-time verdict on ``warden.verdict.<class>`` (neutral, allowed,
    prohibited), with ``Nats-Msg-Id`` set to the event ID so JetStream drops duplicates.
    Stream ``VERDICTS_STREAM`` holds what must be acted on: prohibited verdicts and
    moderation requests (``MODERATION_REQUEST_SUBJECT``); it never drops a message to
    make room (``discard=new``: when full, publishing fails and the verdict outbox keeps
    retrying). The moderator's and the webhooks' durable consumers read it. Stream
    ``VERDICT_LOG_STREAM`` holds neutral and allowed verdicts, a record nobody has to
    act on, whose oldest messages go first when it is full; they are published only with
    ``PS_JETSTREAM_VERDICT_LOG`` on (``is_streamed``), and kept in PostgreSQL either way.

Moderation requests (JetStream, on ``VERDICTS_STREAM``)
    ``MODERATION_REQUEST_SUBJECT`` — an event already judged prohibited, first asked
    about by its sender's own server (so the moderator skipped it), was asked about by
    another server: it has reached others and must be redacted. Published by the gateway
    the first time it sees such an ask. Body: ``{"event_id": ..., "origin": ...}`` (the
    server that asked); ``Nats-Msg-Id`` = ``<event ID>/moderate``, so it is kept once.
    The moderator reads it through its durable consumer ``MODERATION_REQUESTS_CONSUMER``;
    the webhooks do not (the refusal was reported once already).

Inbound federation (JetStream)
    Stream ``INBOUND_STREAM`` holds ``warden.inbound.>``. The gateway publishes each PDU
    of a protected room that arrives in a ``/send`` transaction on
    ``INBOUND_PDU_SUBJECT``: body the PDU JSON as received, headers ``HEADER_ORIGIN``
    (the transaction's origin), ``HEADER_ROOM_VERSION``, ``HEADER_ROOM_ID``,
    ``HEADER_EVENT_ID`` and ``Nats-Msg-Id`` = ``<event ID>/<digest of hashes and
    signatures>`` (a PDU relayed by several servers is kept once; a copy with corrupted
    signatures does not suppress the real one). The filter workers read it through the
    durable consumer ``ROOM_STATE_CONSUMER`` (learned room state, and verdicts for
    events that bypassed the policy server).

Configuration (core NATS)
    ``CONFIG_CHANGED_SUBJECT`` — published by the admin API after a community's config
    or a room's community changes; every worker drops its cached copy. Body:
    ``{"community_id": ...}`` or ``{"room_id": ...}``.

Keyword templates (core NATS)
    ``KEYWORD_TEMPLATES_CHANGED_SUBJECT`` — published by the admin API after a keyword
    template is stored or deleted; every worker reloads that template into its compiled
    cache. Body: ``{"name": ...}``. Workers also reload every template periodically, in
    case a notification was lost while disconnected.
"""

from __future__ import annotations

from typing import Final

from warden.policy.verdict import ContentClass

EVALUATE_SUBJECT: Final = "warden.evaluate.v1"
FILTER_WORKERS_QUEUE: Final = "warden-filter-workers"
CHECK_TEXT_SUBJECT: Final = "warden.check_text.v1"
ANTISPAM_CHECK_SUBJECT: Final = "warden.antispam_check.v1"

VERDICTS_STREAM: Final = "WARDEN_VERDICTS"
VERDICT_SUBJECT_PREFIX: Final = "warden.verdict."
VERDICT_SUBJECTS: Final = VERDICT_SUBJECT_PREFIX + "*"
VERDICT_LOG_STREAM: Final = "WARDEN_VERDICT_LOG"
MODERATION_REQUEST_SUBJECT: Final = "warden.moderate.request"
# The moderator's durable consumer of moderation requests (a second one: the server here
# supports one filter subject per consumer).
MODERATION_REQUESTS_CONSUMER: Final = "warden-moderator-requests"
MODERATOR_CONSUMER: Final = "warden-moderator"
# The moderator's command path (to-device redact commands to moderation bots) reads
# prohibited verdicts and moderation requests through durable consumers of its own, so
# it neither waits for nor repeats the Client-Server API redactions.
MODERATION_COMMANDS_CONSUMER: Final = "warden-moderator-commands"
MODERATION_COMMAND_REQUESTS_CONSUMER: Final = "warden-moderator-commands-requests"
WEBHOOKS_CONSUMER: Final = "warden-webhooks"

CONFIG_CHANGED_SUBJECT: Final = "warden.config.changed"
KEYWORD_TEMPLATES_CHANGED_SUBJECT: Final = "warden.keyword_templates.changed"

INBOUND_STREAM: Final = "WARDEN_INBOUND"
INBOUND_SUBJECTS: Final = "warden.inbound.>"
INBOUND_PDU_SUBJECT: Final = "warden.inbound.pdu"
ROOM_STATE_CONSUMER: Final = "warden-room-state"

# Headers on evaluation requests.
HEADER_ROOM_VERSION: Final = "Warden-Room-Version"
HEADER_COMMUNITY: Final = "Warden-Community"
HEADER_ORIGIN: Final = "Warden-Origin"  # the server that asked (X-Matrix origin)
HEADER_EVENT_ID: Final = "Warden-Event-Id"  # computed by the gateway
HEADER_SOURCE: Final = "Warden-Source"  # "sign", "check" or "send"
# Unpadded base64 sha256 of the redacted event: binds a verdict to the event's form, so
# a reused event ID (room versions 1 and 2) cannot inherit another event's verdict.
HEADER_REFERENCE_HASH: Final = "Warden-Reference-Hash"
# "1" when the sender's server's signature was not verified (a third-party invite may
# lack it): the worker then attributes nothing to the sender unless the room's
# third-party invite vouches for it. Absent in the usual case (signed by the sender's
# server), so it costs nothing there.
HEADER_SENDER_UNSIGNED: Final = "Warden-Sender-Unsigned"
# On inbound PDUs: the room the PDU belongs to (as the gateway looked it up).
HEADER_ROOM_ID: Final = "Warden-Room-Id"
# On antispam checks: which filters judge the event ("event", "username" or
# "publish_room").
HEADER_ANTISPAM_KIND: Final = "Warden-Antispam-Kind"


def verdict_subject(content_class: str) -> str:
    """The JetStream subject for a verdict of ``content_class``."""
    return VERDICT_SUBJECT_PREFIX + content_class


def is_streamed(content_class: ContentClass, *, verdict_log: bool) -> bool:
    """Whether a first-time verdict of this class is published to JetStream.

    Refusals always are (``WARDEN_VERDICTS``: the moderator and webhooks act on them).
    Neutral and allowed verdicts only with the verdict log on
    (``PS_JETSTREAM_VERDICT_LOG``): nothing in Warden reads them, PostgreSQL keeps every
    verdict, and streaming each costs a JetStream write and an outbox update per event.
    A verdict that is not streamed is stored as published, so the outbox never holds it.
    """
    return verdict_log or content_class is ContentClass.PROHIBITED
