"""Moderators' Client-Server API clients: who each token belongs to, and redacting.

``PS_MODERATOR_ACCESS_TOKENS`` names tokens, not users; each token's user is learned
with ``GET /_matrix/client/v3/account/whoami``. policyserv stops at start when a
whoami fails; here a failed lookup is logged and retried in the background with
backoff, so one homeserver being down at start cannot stop all moderation. A token
the homeserver rejects (401/403) is marked invalid and not asked about again.

Redactions use a transaction ID derived from the event ID, so the homeserver (which
deduplicates by transaction ID per access token) turns a repeated request (a JetStream
redelivery after a crash, say) into the same single redaction.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import httpx
import orjson

from warden.bus.consumer import backoff_delay
from warden.outbound_http import (
    USER_AGENT,
    Attempt,
    Result,
    attempt_from_exception,
    attempt_from_response,
    read_capped,
)
from warden.settings import ModeratorToken
from warden_moderator.metrics import MODERATOR_CLIENTS

logger = logging.getLogger(__name__)

REDACTION_REASON = "Refused by the room's policy server"
TXN_PREFIX = "warden_"

ClientState = Literal["pending", "resolved", "invalid"]


def redaction_txn_id(event_id: str) -> str:
    """The transaction ID for redacting ``event_id``: the same every time for that event."""
    digest = hashlib.sha256(event_id.encode("utf-8")).digest()
    return TXN_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def redaction_path(room_id: str, event_id: str, txn_id: str) -> str:
    """The redact endpoint's path with every part percent-encoded."""
    return (
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
        f"/redact/{quote(event_id, safe='')}/{quote(txn_id, safe='')}"
    )


@dataclass
class ModeratorClient:
    """One configured token, and (once known) the user it belongs to."""

    position: int  # 1-based place in PS_MODERATOR_ACCESS_TOKENS, for logs
    base_url: str
    access_token: str
    user_id: str | None = None
    state: ClientState = "pending"
    failures: int = 0

    def __repr__(self) -> str:  # the token is a secret
        return (
            f"ModeratorClient(position={self.position}, base_url={self.base_url!r}, "
            f"user_id={self.user_id!r}, state={self.state!r})"
        )


class ClientAPI:
    """The moderator tokens and the HTTP calls made with them."""

    def __init__(
        self,
        tokens: list[ModeratorToken],
        *,
        timeout: float,
        retry_base_seconds: float = 2.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.clients = [
            ModeratorClient(i, t.base_url, t.access_token) for i, t in enumerate(tokens, start=1)
        ]
        self._retry_base = retry_base_seconds
        self._timeout = timeout
        # Redirects are not followed: the token must only ever go to the configured host.
        self._http = http or httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
        )
        self._update_gauge()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    @property
    def any_pending(self) -> bool:
        """True while some token's user is not known yet (it may be any room's moderator)."""
        return any(c.state == "pending" for c in self.clients)

    def for_user(self, user_id: str) -> ModeratorClient | None:
        """The resolved client acting as ``user_id`` (the first configured one), if any."""
        for c in self.clients:
            if c.state == "resolved" and c.user_id == user_id:
                return c
        return None

    def _update_gauge(self) -> None:
        for state in ("resolved", "pending", "invalid"):
            MODERATOR_CLIENTS.labels(state).set(sum(1 for c in self.clients if c.state == state))

    async def resolve_pending(self) -> None:
        """Ask whoami for every token whose user is not known yet, concurrently."""
        pending = [c for c in self.clients if c.state == "pending"]
        await asyncio.gather(*(self._whoami(c) for c in pending))
        self._update_gauge()

    async def keep_resolving(self, stopping: asyncio.Event) -> None:
        """Look every token up now, then retry pending ones with backoff until done."""
        await self.resolve_pending()
        attempt = 0
        while self.any_pending and not stopping.is_set():
            attempt += 1
            delay = backoff_delay(attempt, self._retry_base)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await self.resolve_pending()

    async def _whoami(self, client: ModeratorClient) -> None:
        url = client.base_url + "/_matrix/client/v3/account/whoami"
        headers = {"Authorization": f"Bearer {client.access_token}"}
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._http.stream("GET", url, headers=headers) as response,
            ):
                body = await read_capped(response)
                status = response.status_code
        except httpx.HTTPError as exc:
            self._whoami_failed(client, attempt_from_exception(exc).error)
            return
        except TimeoutError:
            self._whoami_failed(client, f"timed out after {self._timeout}s")
            return
        if status in (401, 403):
            client.state = "invalid"
            logger.error(
                "moderator access token rejected by its homeserver; not retrying",
                extra={
                    "event": "moderator_token_invalid",
                    "position": client.position,
                    "base_url": client.base_url,
                    "status": status,
                },
            )
            return
        user_id = None
        if status == 200:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("user_id"), str):
                user_id = data["user_id"]
        if user_id is None or not user_id.startswith("@"):
            self._whoami_failed(client, f"HTTP {status} without a user_id")
            return
        client.user_id = user_id
        client.state = "resolved"
        logger.info(
            "moderator token resolved",
            extra={
                "event": "moderator_token_resolved",
                "position": client.position,
                "base_url": client.base_url,
                "user_id": user_id,
            },
        )

    def _whoami_failed(self, client: ModeratorClient, error: str) -> None:
        client.failures += 1
        logger.warning(
            "whoami for a moderator token failed; will retry",
            extra={
                "event": "moderator_whoami_failed",
                "position": client.position,
                "base_url": client.base_url,
                "error": error,
                "failures": client.failures,
            },
        )

    async def redact(
        self, client: ModeratorClient, room_id: str, event_id: str, reason: str
    ) -> Attempt:
        """``PUT .../redact/{eventId}/{txnId}`` as ``client``; one attempt, classified."""
        url = client.base_url + redaction_path(room_id, event_id, redaction_txn_id(event_id))
        headers = {
            "Authorization": f"Bearer {client.access_token}",
            "Content-Type": "application/json",
        }
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._http.stream(
                    "PUT", url, headers=headers, content=orjson.dumps({"reason": reason})
                ) as response,
            ):
                attempt = await attempt_from_response(response)
        except httpx.HTTPError as exc:
            return attempt_from_exception(exc)
        except TimeoutError:
            return Attempt(Result.TEMPORARY, None, f"timed out after {self._timeout}s")
        return attempt
