"""Redaction commands to moderation bots: building, signing and queueing them.

Reference §2.3 (policyserv's to-device protocol): when a community sets
``moderation_bot_user_id``, each prohibited verdict becomes the content
``{"command": "redact", "room_id", "event_id"}``, signed with the policy key as
``ed25519:policy_server`` (Matrix JSON signing, so the bot checks it against the key
in the room's ``m.room.policy``), sent as an ``m.direct_to_device`` EDU of type
``org.matrix.policyserv.command`` from ``@<PS_JOIN_LOCALPART>:<server name>`` to the
bot (device ``*``) at the bot's server. It is fire and forget: the bot neither
acknowledges nor answers.

``CommandEnqueuer`` is a verdict handler beside the Client-Server API ``Redactor``,
on durable consumers of its own, so either mechanism, or both, can serve a community.
It applies the same rules on which refusals to act (not the sender's own server's,
not an unverified sender's), queues the EDU in PostgreSQL and wakes the sender
(``command_sender.py``). The message is acknowledged once the EDU is stored.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import orjson
from unpaddedbase64 import encode_base64

from warden.bus.consumer import ACK, Delivery, Disposition
from warden.bus.subjects import MODERATION_REQUEST_SUBJECT
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.ids import server_name_of
from warden.matrix.keys import POLICY_SERVER_KEY_ID, SigningKey
from warden.policy.config import ConfigError
from warden.policy.moderation_bot import KEY as BOT_KEY
from warden.policy.moderation_bot import validate_user_id
from warden.policy.verdict import Verdict
from warden.storage import moderation_commands
from warden.storage.communities import get_community
from warden.storage.verdicts import get_verdict
from warden_moderator.metrics import MODERATION_COMMANDS

logger = logging.getLogger(__name__)

EDU_TYPE = "m.direct_to_device"
COMMAND_TYPE = "org.matrix.policyserv.command"


def sign_command(
    content: Mapping[str, Any], server_name: str, policy_key: SigningKey
) -> dict[str, Any]:
    """``content`` with ``signatures.<server_name>.ed25519:policy_server`` added."""
    unsigned = {k: v for k, v in content.items() if k not in ("signatures", "unsigned")}
    signature = policy_key.sign(encode_canonical_json(unsigned)).signature
    signed = dict(content)
    signed["signatures"] = {server_name: {POLICY_SERVER_KEY_ID: encode_base64(signature)}}
    return signed


def build_command_edu(
    *,
    server_name: str,
    sender: str,
    bot_user_id: str,
    room_id: str,
    event_id: str,
    policy_key: SigningKey,
    message_id: str | None = None,
) -> dict[str, Any]:
    """The to-device EDU carrying one signed redact command for ``bot_user_id``."""
    content = sign_command(
        {"command": "redact", "room_id": room_id, "event_id": event_id}, server_name, policy_key
    )
    return {
        "edu_type": EDU_TYPE,
        "content": {
            "sender": sender,
            "type": COMMAND_TYPE,
            "message_id": message_id or secrets.token_urlsafe(16),
            "messages": {bot_user_id: {"*": content}},
        },
    }


class CommandEnqueuer:
    """Verdict handler: queue a redact command for the community's moderation bot."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        server_name: str,
        sender: str,
        policy_key: SigningKey,
        instance_config: Mapping[str, Any],
        max_queued: int,
        wake: Callable[[], None] = lambda: None,
        moderation_subject: str = MODERATION_REQUEST_SUBJECT,
    ) -> None:
        self._pool = pool
        self._server_name = server_name
        self._sender = sender
        self._policy_key = policy_key
        self._instance = dict(instance_config)
        self._max_queued = max_queued
        self._wake = wake
        self._moderation_subject = moderation_subject

    async def __call__(self, delivery: Delivery) -> Disposition:
        """Handle one verdict or moderation request; acknowledge once queued."""
        try:
            verdict = await self._verdict(delivery)
        except (ValueError, KeyError, TypeError) as exc:
            logger.error(
                "moderation command: invalid message",
                extra={
                    "event": "moderation_command",
                    "outcome": "invalid",
                    "stream_sequence": delivery.stream_sequence,
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                },
            )
            return ACK
        if verdict is None or not verdict.prohibited or not verdict.community_id:
            return ACK
        # The same rules as the Client-Server API redaction (redactor.py).
        if _server_of(verdict.sender) == verdict.origin or not verdict.sender_verified:
            return ACK
        bot = await self._bot_of(verdict.community_id)
        if not bot:
            return ACK
        edu = build_command_edu(
            server_name=self._server_name,
            sender=self._sender,
            bot_user_id=bot,
            room_id=verdict.room_id,
            event_id=verdict.event_id,
            policy_key=self._policy_key,
        )
        destination = server_name_of(bot)
        outcome = await moderation_commands.enqueue(
            self._pool,
            destination=destination,
            event_id=verdict.event_id,
            edu_json=orjson.dumps(edu).decode(),
            now_ms=int(time.time() * 1000),
            max_queued=self._max_queued,
        )
        MODERATION_COMMANDS.labels(outcome).inc()
        logger.log(
            logging.WARNING if outcome == "queue_full" else logging.INFO,
            "moderation command",
            extra={
                "event": "moderation_command",
                "outcome": outcome,
                "destination": destination,
                "event_id": verdict.event_id,
                "room_id": verdict.room_id,
            },
        )
        if outcome == "queued":
            self._wake()
        return ACK

    async def _verdict(self, delivery: Delivery) -> Verdict | None:
        if delivery.subject != self._moderation_subject:
            return Verdict.from_json(delivery.data)
        request = orjson.loads(delivery.data)
        if not isinstance(request, dict):
            raise ValueError("a moderation request must be a JSON object")
        event_id, origin = request["event_id"], request["origin"]
        if not isinstance(event_id, str) or not isinstance(origin, str):
            raise TypeError("event_id and origin must be strings")
        stored = await get_verdict(self._pool, event_id)
        return None if stored is None else dataclasses.replace(stored, origin=origin)

    async def _bot_of(self, community_id: str) -> str:
        community = await get_community(self._pool, community_id)
        if community is None:
            return ""
        stored = dict(community.config)
        if not isinstance(stored.get(BOT_KEY, ""), str):
            stored.pop(BOT_KEY)  # a malformed row: fall back to the instance default
        raw = {**self._instance, **stored}.get(BOT_KEY, "")
        try:
            return validate_user_id(raw)
        except ConfigError:
            MODERATION_COMMANDS.labels("invalid_bot").inc()
            logger.warning(
                "moderation command: the configured bot is not a user ID",
                extra={
                    "event": "moderation_command",
                    "outcome": "invalid_bot",
                    "community_id": community_id,
                },
            )
            return ""


def _server_of(user_id: str) -> str | None:
    try:
        return server_name_of(user_id)
    except ValueError:
        return None
