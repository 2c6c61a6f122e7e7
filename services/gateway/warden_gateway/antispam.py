"""Warden as a homeserver's spam checker: ``POST /_warden/antispam/v1/<callback>``.

The protocol of ``synapse-http-antispam``: the module POSTs each spam-checker callback
to ``<base_url>/<callback name>`` with the callback's arguments as a JSON object and
``Authorization: Bearer <token>``. Here the token is a community access token
(``CommunityAuth``): the homeserver is a community, and that community's configuration
(filters, dry run, conditions, policy lists, webhooks) decides.

Answers:

- not spam: 200 ``{}``;
- spam: 403 ``M_FORBIDDEN`` with ``error``, the harm IDs in ``harms`` and
  ``org.matrix.msc4387.harms`` (the module hands the errcode and the rest of the body to
  the homeserver, which shows them to the client);
- a request Warden cannot read: a Matrix error (400 ``M_NOT_JSON`` / ``M_BAD_JSON``,
  401 ``M_MISSING_TOKEN`` / ``M_UNKNOWN_TOKEN``, 413, 429), which the module also turns
  into a rejection with that errcode;
- no judgement (no filter worker answered in time, a dependency failed): 503 with
  ``Retry-After`` and a *plain-text* body. The module applies the callback's
  ``fail_open`` only to a body that is not JSON (or no answer at all), so this is what
  lets the operator's per-callback choice decide while Warden cannot judge.

What decides each callback (docs/apis.md has the full table):

- ``check_event_for_spam`` ``{"event"}``: the event (client format, with ``event_id``)
  through every filter on a filter worker, as ``/sign`` has events judged
  (``VerdictSource``, source ``antispam``). The verdict is stored under
  ``antispam:<community>:<event ID>``, bound to a hash of the event as sent: a
  homeserver's answers never become the verdict ``/sign`` gives another community's
  room for the same event ID. Its origin is the sender's server, so the moderator does
  not redact (the homeserver refuses the event itself) and the webhooks report it.
- ``user_may_invite`` ``{"inviter", "invitee", "room_id"}``: an ``m.room.member``
  invite from the inviter to the invitee through every filter (policy-list bans of
  either, invite rate); ``federated_user_may_invite`` ``{"event"}``: the invite event
  itself, the same way.
- ``user_may_join_room`` ``{"user", "room", "is_invited"}``: an ``m.room.member`` join
  by the user (policy-list bans of the user and the user's server, join rate).
- ``user_may_create_room`` ``{"user_id"}``: an ``m.room.create``;
  ``user_may_send_3pid_invite`` ``{"inviter", "medium", "address", "room_id"}``: an
  ``m.room.third_party_invite`` from the inviter (no content: the address is not
  judged); ``check_login_for_spam`` ``{"user_id", ...}``: an
  ``org.warden.antispam.login`` event. Each by every filter: policy lists, and the
  frequency filter when the community lists the type.
- ``user_may_create_room_alias`` ``{"user_id", "room_alias"}``: the alias through the
  text filters (``CHECK_TEXT_SUBJECT``, as ``/_policyserv/v1/check/text``).
- ``user_may_publish_room`` ``{"user_id", "room_id"}``: the publisher's policy-list bans
  (an ``org.warden.antispam.publish_room`` event, kind ``publish_room``), then the
  room's name and topic from Warden's learned room state through the text filters.
  Synapse passes no name or topic: a room Warden is not in has none to judge (its
  ``m.room.name`` and ``m.room.topic``, set by local users, were judged by
  ``check_event_for_spam`` when they were set).
- ``check_username_for_spam`` ``{"user_profile": {"user_id", "display_name"},
  "requester_id"}``: the user ID through the user-ID filters and the display name
  through the text filters.
- ``accept_make_join``: not judged (200).

``POST /_warden/antispam/v1/ping`` ``{"id"}`` (same token) answers
``{"id", "status": "ok"}``.

Every decision is counted in ``warden_antispam_callbacks_total{callback,outcome}`` and
timed in ``warden_antispam_callback_seconds{callback}``, and logged (community, callback,
outcome, harms; never content).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.bus.evaluation import EvaluationRequest
from warden.bus.request_reply import Requester
from warden.bus.subjects import (
    ANTISPAM_CHECK_SUBJECT,
    CHECK_TEXT_SUBJECT,
    HEADER_ANTISPAM_KIND,
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
)
from warden.matrix.errors import BadJSON, Forbidden, MatrixError, NotJSON
from warden.policy.antispam_keys import antispam_verdict_key
from warden.policy.harms import HARMS_FIELD
from warden.storage.records import Community
from warden_gateway.community_auth import CommunityAuth
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.request_body import read_limited_body
from warden_gateway.verdict_source import VerdictSource

logger = logging.getLogger(__name__)

PREFIX = "/_warden/antispam/v1"
PING_PATH = PREFIX + "/ping"
CALLBACK_PATH = PREFIX + "/{callback}"
SOURCE = "antispam"
KIND_EVENT = "event"
KIND_USERNAME = "username"
KIND_PUBLISH_ROOM = "publish_room"
LOGIN_EVENT_TYPE = "org.warden.antispam.login"
PUBLISH_EVENT_TYPE = "org.warden.antispam.publish_room"
# Matrix identifiers are at most 255 bytes.
MAX_ID_BYTES = 255
MAX_DISPLAY_NAME_CHARS = 1024
RETRY_AFTER_SECONDS = 2

# Callbacks the module may send that Warden does not judge: answered "not spam".
NOT_JUDGED = frozenset({"accept_make_join"})

ANTISPAM_CALLBACKS = Counter(
    "warden_antispam_callbacks_total",
    "Homeserver spam-checker callbacks (/_warden/antispam/v1), by callback (unknown for "
    "a name Warden does not serve) and outcome (allowed, refused, unavailable, "
    "not_judged, or an error's errcode).",
    ["callback", "outcome"],
)
ANTISPAM_CALLBACK_SECONDS = Histogram(
    "warden_antispam_callback_seconds",
    "Time to answer a homeserver spam-checker callback, by callback.",
    ["callback"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class SpamRefusal(Forbidden):
    """403 ``M_FORBIDDEN`` with the harms: what the homeserver shows the client."""


class UnknownCallback(MatrixError):
    """404 ``M_UNRECOGNIZED``: a callback name Warden does not serve."""

    errcode = "M_UNRECOGNIZED"
    status = 404


class _NoJudgement(Exception):
    """No filter worker judged the callback; answered 503 in plain text."""


def _hash(event: dict[str, Any]) -> str:
    """What binds a stored verdict to the event as the homeserver sent it (``unsigned``
    left out: it differs between asks)."""
    covered = {k: v for k, v in event.items() if k != "unsigned"}
    digest = hashlib.sha256(orjson.dumps(covered, option=orjson.OPT_SORT_KEYS)).digest()
    return base64.b64encode(digest).decode().rstrip("=")


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise BadJSON(f"'{name}' is required")
    return body[name]


def _identifier(body: dict[str, Any], name: str, sigil: str) -> str:
    value = _field(body, name)
    # Room IDs of room version 12 have no server name; user IDs and aliases always do.
    if (
        not isinstance(value, str)
        or len(value) < 2
        or not value.startswith(sigil)
        or (sigil != "!" and ":" not in value)
        or len(value.encode("utf-8")) > MAX_ID_BYTES
    ):
        raise BadJSON(f"'{name}' must be an identifier starting with '{sigil}'")
    return value


def _event(body: dict[str, Any]) -> dict[str, Any]:
    event = _field(body, "event")
    if not isinstance(event, dict):
        raise BadJSON("'event' must be an object")
    _identifier(event, "sender", "@")
    event_id = _field(event, "event_id")
    if not isinstance(event_id, str) or not event_id.startswith("$"):
        raise BadJSON("'event.event_id' must be an event ID")
    if len(event_id.encode("utf-8")) > MAX_ID_BYTES:
        raise BadJSON("'event.event_id' is too long")
    if not isinstance(_field(event, "type"), str):
        raise BadJSON("'event.type' must be a string")
    if not isinstance(event.get("content", {}), dict):
        raise BadJSON("'event.content' must be an object")
    return event


def _server_of(user_id: str) -> str:
    return user_id.partition(":")[2]


class AntispamAPI:
    """The ``/_warden/antispam/v1`` routes."""

    def __init__(
        self,
        *,
        auth: CommunityAuth,
        nats: NATS,
        verdicts: VerdictSource,
        max_body_bytes: int,
        timeout_seconds: float,
        check_subject: str = ANTISPAM_CHECK_SUBJECT,
        text_subject: str = CHECK_TEXT_SUBJECT,
        rate_limiter: OriginRateLimiter | None = None,
    ) -> None:
        """``rate_limiter``: the callbacks' own per-community budget
        (``PS_ANTISPAM_RATE_LIMIT_PER_MINUTE``; None: unlimited), apart from the
        server-centric API's, which a homeserver's message rate would spend at once."""
        self.auth = auth
        self._limiter = rate_limiter
        self._requests = Requester(nats)
        self._verdicts = verdicts
        self._max_body_bytes = max_body_bytes
        self._timeout = timeout_seconds
        self._check_subject = check_subject
        self._text_subject = text_subject
        self._metric_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._callbacks: dict[str, Callable[[Community, dict[str, Any]], Awaitable[list[str]]]] = {
            "check_event_for_spam": self._check_event,
            "user_may_invite": self._user_may_invite,
            "federated_user_may_invite": self._federated_invite,
            "user_may_join_room": self._user_may_join_room,
            "user_may_create_room": self._user_may_create_room,
            "user_may_send_3pid_invite": self._user_may_send_3pid_invite,
            "check_login_for_spam": self._check_login,
            "user_may_create_room_alias": self._user_may_create_room_alias,
            "user_may_publish_room": self._user_may_publish_room,
            "check_username_for_spam": self._check_username,
        }

    @property
    def callbacks(self) -> tuple[str, ...]:
        """The callback names Warden judges."""
        return tuple(self._callbacks)

    def routes(self) -> list[Route]:
        """The routes to add to the federation-facing app (ping first: it is no callback)."""
        return [
            Route(PING_PATH, self.ping, methods=["POST"]),
            Route(CALLBACK_PATH, self.callback, methods=["POST"]),
        ]

    async def _read_object(self, request: Request) -> dict[str, Any]:
        body = await read_limited_body(request, self._max_body_bytes)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise NotJSON("Request body is not JSON") from None
        if not isinstance(value, dict):
            raise BadJSON("Request body must be a JSON object")
        return value

    async def ping(self, request: Request) -> Response:
        """``POST /_warden/antispam/v1/ping``: ``{"id"}`` -> ``{"id", "status": "ok"}``."""
        try:
            await self.auth.authenticate(request, limiter=self._limiter)
            body = await self._read_object(request)
            ping_id = body.get("id")
            if not isinstance(ping_id, str) or len(ping_id) > MAX_ID_BYTES:
                raise BadJSON("'id' must be a string")
        except MatrixError as exc:
            ANTISPAM_CALLBACKS.labels("ping", exc.errcode).inc()
            return error_response(exc)
        ANTISPAM_CALLBACKS.labels("ping", "ok").inc()
        return Response(
            orjson.dumps({"id": ping_id, "status": "ok"}), media_type="application/json"
        )

    async def callback(self, request: Request) -> Response:
        """``POST /_warden/antispam/v1/<callback>``."""
        name = str(request.path_params["callback"])
        handler = self._callbacks.get(name)
        label = name if handler is not None or name in NOT_JUDGED else "unknown"
        start = time.perf_counter()
        outcome = "M_UNKNOWN"
        community_id = ""
        try:
            community = await self.auth.authenticate(request, limiter=self._limiter)
            community_id = community.community_id
            if handler is None:
                if name in NOT_JUDGED:
                    outcome = "not_judged"
                    return Response(b"{}", media_type="application/json")
                raise UnknownCallback(f"Unknown spam-checker callback: {name[:64]}")
            harms = await handler(community, await self._read_object(request))
            if harms:
                outcome = "refused"
                logger.info(
                    "antispam: refused",
                    extra={"community_id": community_id, "callback": name, "harms": harms},
                )
                return error_response(
                    SpamRefusal(
                        "This is not allowed by the server's spam policy",
                        harms=harms,
                        **{HARMS_FIELD: harms},
                    )
                )
            outcome = "allowed"
            return Response(b"{}", media_type="application/json")
        except _NoJudgement as exc:
            outcome = "unavailable"
            logger.warning(
                "antispam: not judged",
                extra={"community_id": community_id, "callback": name, "error": str(exc)},
            )
            # Plain text on purpose: the module's fail_open applies to non-JSON answers.
            return Response(
                f"M_UNKNOWN: {exc}",
                status_code=503,
                media_type="text/plain",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except MatrixError as exc:
            outcome = exc.errcode
            return error_response(exc)
        finally:
            children = self._metric_children.get((label, outcome))
            if children is None:
                # Bound once per (callback, outcome), both bounded: ``labels()`` takes a
                # lock and builds a key on every call.
                children = self._metric_children[label, outcome] = (
                    ANTISPAM_CALLBACKS.labels(label, outcome),
                    ANTISPAM_CALLBACK_SECONDS.labels(label),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)

    # -- the callbacks: each returns the harms (empty: not spam) --------------------

    async def _check_event(self, community: Community, body: dict[str, Any]) -> list[str]:
        event = _event(body)
        if event["type"] == "m.room.policy" and event.get("state_key") == "":
            return []  # as /sign: a room must always be able to change its policy server
        event_id = event["event_id"]
        reference_hash = _hash(event)
        try:
            entry = await self._verdicts.get(
                EvaluationRequest(
                    event_id=antispam_verdict_key(community.community_id, event_id),
                    community_id=community.community_id,
                    reference_hash=reference_hash,
                    origin=_server_of(event["sender"]),
                    source=SOURCE,
                    pdu=orjson.dumps(event),
                )
            )
        except TemporarilyUnavailable as exc:
            raise _NoJudgement(exc.error) from None
        if entry.reference_hash != reference_hash:
            # The same event ID sent before with other content: never "not spam".
            logger.warning(
                "antispam: event ID judged before for other content",
                extra={"community_id": community.community_id, "event_id": event_id},
            )
            return list(entry.harms) or ["org.matrix.msc4456.other"]
        return list(entry.harms) if entry.prohibited else []

    async def _judge(self, community: Community, kind: str, event: dict[str, Any]) -> list[str]:
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            event_id = f"$antispam-{secrets.token_urlsafe(16)}"
            event = {**event, "event_id": event_id}
        event.setdefault("origin_server_ts", int(time.time() * 1000))
        event.setdefault("room_id", "")
        headers = {
            HEADER_COMMUNITY: community.community_id,
            HEADER_EVENT_ID: event_id,
            HEADER_ANTISPAM_KIND: kind,
        }
        return await self._request(self._check_subject, orjson.dumps(event), headers)

    async def _request(self, subject: str, data: bytes, headers: dict[str, str]) -> list[str]:
        try:
            reply = await self._requests.request(
                subject, data, timeout_seconds=self._timeout, headers=headers
            )
        except (NatsTimeoutError, NoRespondersError):
            raise _NoJudgement("No filter worker answered in time") from None
        except (NatsError, OSError) as exc:
            logger.warning("antispam request failed", extra={"error": repr(exc)})
            raise _NoJudgement("The filter workers cannot be reached") from None
        try:
            answer = orjson.loads(reply.data)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("harms"), list):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise _NoJudgement(f"not judged: {str(error)[:200]}")
        return [h for h in answer["harms"] if isinstance(h, str)]

    async def _member(
        self, community: Community, sender: str, target: str, room_id: str, membership: str
    ) -> list[str]:
        event = {
            "type": "m.room.member",
            "sender": sender,
            "state_key": target,
            "room_id": room_id,
            "content": {"membership": membership},
        }
        return await self._judge(community, KIND_EVENT, event)

    async def _user_may_invite(self, community: Community, body: dict[str, Any]) -> list[str]:
        inviter = _identifier(body, "inviter", "@")
        invitee = _identifier(body, "invitee", "@")
        room_id = _identifier(body, "room_id", "!")
        return await self._member(community, inviter, invitee, room_id, "invite")

    async def _federated_invite(self, community: Community, body: dict[str, Any]) -> list[str]:
        event = _event(body)
        content = event.get("content", {})
        if event["type"] != "m.room.member" or content.get("membership") != "invite":
            raise BadJSON("'event' must be an invite (m.room.member, membership invite)")
        _identifier(event, "state_key", "@")
        return await self._judge(community, KIND_EVENT, dict(event))

    async def _user_may_join_room(self, community: Community, body: dict[str, Any]) -> list[str]:
        user = _identifier(body, "user", "@")
        room = _identifier(body, "room", "!")
        return await self._member(community, user, user, room, "join")

    async def _user_may_create_room(self, community: Community, body: dict[str, Any]) -> list[str]:
        user_id = _identifier(body, "user_id", "@")
        event = {"type": "m.room.create", "sender": user_id, "state_key": "", "content": {}}
        return await self._judge(community, KIND_EVENT, event)

    async def _user_may_send_3pid_invite(
        self, community: Community, body: dict[str, Any]
    ) -> list[str]:
        inviter = _identifier(body, "inviter", "@")
        room_id = _identifier(body, "room_id", "!")
        event = {
            "type": "m.room.third_party_invite",
            "sender": inviter,
            "state_key": secrets.token_urlsafe(12),
            "room_id": room_id,
            "content": {},
        }
        return await self._judge(community, KIND_EVENT, event)

    async def _check_login(self, community: Community, body: dict[str, Any]) -> list[str]:
        user_id = _identifier(body, "user_id", "@")
        event = {"type": LOGIN_EVENT_TYPE, "sender": user_id, "content": {}}
        return await self._judge(community, KIND_EVENT, event)

    async def _user_may_publish_room(self, community: Community, body: dict[str, Any]) -> list[str]:
        user_id = _identifier(body, "user_id", "@")
        room_id = _identifier(body, "room_id", "!")
        event = {"type": PUBLISH_EVENT_TYPE, "sender": user_id, "room_id": room_id, "content": {}}
        return await self._judge(community, KIND_PUBLISH_ROOM, event)

    async def _user_may_create_room_alias(
        self, community: Community, body: dict[str, Any]
    ) -> list[str]:
        _identifier(body, "user_id", "@")
        alias = _identifier(body, "room_alias", "#")
        headers = {HEADER_COMMUNITY: community.community_id}
        return await self._request(self._text_subject, alias.encode("utf-8"), headers)

    async def _check_username(self, community: Community, body: dict[str, Any]) -> list[str]:
        profile = _field(body, "user_profile")
        if not isinstance(profile, dict):
            raise BadJSON("'user_profile' must be an object")
        user_id = _identifier(profile, "user_id", "@")
        display_name = profile.get("display_name")
        if display_name is not None and not isinstance(display_name, str):
            raise BadJSON("'user_profile.display_name' must be a string or null")
        event = {
            "type": "m.room.message",
            "sender": user_id,
            "content": {"msgtype": "m.text", "body": (display_name or "")[:MAX_DISPLAY_NAME_CHARS]},
        }
        return await self._judge(community, KIND_USERNAME, event)
