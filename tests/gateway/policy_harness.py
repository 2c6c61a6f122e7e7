"""Test parties for the policy API: origin homeservers and a stand-in filter worker.

* ``Origin`` plays a homeserver: its key document is served by a real local HTTPS
  server (certificate from the test CA), its name is ``127.0.0.1:<port>``, and it builds
  PDUs hashed and signed by Synapse's own code (``add_hashes_and_signatures``) and
  X-Matrix headers for its requests.
* ``StandInWorker`` is a real NATS subscriber in the filter workers' queue group that
  answers evaluation requests with verdicts the test chooses and records each request.
  It stands in for the filter-worker service (a test double for the worker, not a fake
  of NATS).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from signedjson.key import decode_verify_key_bytes, generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures
from synapse.synapse_rust.events import redact_event_dict

from warden import redis_keys
from warden.bus.subjects import (
    FILTER_WORKERS_QUEUE,
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_REFERENCE_HASH,
    HEADER_ROOM_VERSION,
)
from warden.federation.server_key_document import build_server_key_document
from warden.federation.xmatrix import sign_request
from warden.matrix.keys import POLICY_SERVER_KEY_ID, SigningKey
from warden.policy.verdict import ContentClass, Verdict
from warden.runtime.identity import Identity
from warden.settings import DEFAULT_DENIED_NETWORKS, Settings
from warden_gateway.app import GatewayApp
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.room_cache import RoomCache
from warden_gateway.verdict_source import VerdictSource

SIGN_PATH = "/_matrix/policy/v1/sign"
UNSTABLE_SIGN_PATH = "/_matrix/policy/unstable/org.matrix.msc4284/sign"
GATEWAY_NAME = "warden.test"


# What the gateway needs to fetch keys from the command's local origin (dev only).
DEV_ORIGIN_ENV = {
    "PS_DIRECT_KEY_FETCHING": "true",
    "PS_FEDERATION_VERIFY_TLS": "false",
    "PS_KEY_QUERY_SERVER": "",
    "PS_HOMESERVER_DENIED_NETWORKS": ",".join(
        n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
    ),
}


async def run_command(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run ``warden sign-request`` as a child process; return exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden",
        "sign-request",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def parse_output(stdout: str) -> tuple[int, Any]:
    """The status and JSON body that ``warden sign-request`` printed."""
    first, _, rest = stdout.partition("\n")
    assert first.startswith("HTTP "), stdout
    return int(first.removeprefix("HTTP ")), orjson.loads(rest)


def new_room_id(room_version: str, server: str = "origin.test") -> str:
    """A fresh room ID in the room version's format."""
    opaque = uuid.uuid4().hex
    return f"!{opaque}" if room_version == "12" else f"!{opaque}:{server}"


@dataclass
class Origin:
    """A homeserver that asks for signatures; ``name`` is set once its key server runs."""

    key: SigningKey = field(
        default_factory=lambda: generate_signing_key("o" + uuid.uuid4().hex[:8])
    )
    name: str = ""
    key_fetches: int = 0

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.key.version}"

    def key_server_app(self) -> Starlette:
        """Serves ``GET /_matrix/key/v2/server`` for this origin."""

        async def keys(request: Request) -> Response:
            self.key_fetches += 1
            doc = build_server_key_document(self.name, self.key)
            return Response(orjson.dumps(doc), media_type="application/json")

        return Starlette(routes=[Route("/_matrix/key/v2/server", keys, methods=["GET"])])

    def event(
        self,
        room_id: str,
        room_version: str,
        *,
        body: str = "hello",
        event_type: str = "m.room.message",
        content: dict[str, Any] | None = None,
        state_key: str | None = None,
        sender: str | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """A PDU from this origin, hashed and signed by Synapse's code."""
        event: dict[str, Any] = {
            "type": event_type,
            "room_id": room_id,
            "sender": sender or f"@alice:{self.name}",
            "content": content if content is not None else {"msgtype": "m.text", "body": body},
            "origin_server_ts": int(time.time() * 1000),
            "depth": 10,
            "prev_events": [],
            "auth_events": [],
        }
        if state_key is not None:
            event["state_key"] = state_key
        if room_version in ("1", "2"):
            event["event_id"] = event_id or f"${uuid.uuid4().hex}:{self.name}"
            event["origin"] = self.name
        add_hashes_and_signatures(SYNAPSE_VERSIONS[room_version], event, self.name, self.key)
        event["unsigned"] = {"age_ts": event["origin_server_ts"]}
        return event

    def auth(self, uri: str, content: Any, destination: str = GATEWAY_NAME) -> str:
        """The ``Authorization`` header for a POST of ``content`` to ``uri``."""
        return sign_request(self.name, destination, "POST", uri, content, self.key)

    def headers(self, uri: str, content: Any, destination: str = GATEWAY_NAME) -> dict[str, str]:
        """Headers for a signed JSON POST."""
        return {
            "Authorization": self.auth(uri, content, destination),
            "Content-Type": "application/json",
        }


def synapse_verifies(
    room_version: str, event: dict[str, Any], server: str, signature: str, policy_key: Any
) -> bool:
    """Whether Synapse would accept ``signature`` as ``server``'s ``ed25519:policy_server``
    signature on ``event``: its redaction, then signedjson with the key from
    ``m.room.policy`` (what Synapse does with a /sign answer)."""
    signed = dict(event)
    signed["signatures"] = {server: {POLICY_SERVER_KEY_ID: signature}}
    redacted = redact_event_dict(SYNAPSE_VERSIONS[room_version], signed)
    redacted.pop("unsigned", None)
    redacted.pop("age_ts", None)
    # The key as Synapse builds it from m.room.policy: always version "policy_server".
    verify_key = decode_verify_key_bytes(POLICY_SERVER_KEY_ID, bytes(get_verify_key(policy_key)))
    try:
        verify_signed_json(redacted, server, verify_key)
    except Exception:
        return False
    return True


@dataclass
class Gateway:
    """One in-process gateway app and what it was built from."""

    app: GatewayApp
    client: httpx.AsyncClient
    identity: Identity
    settings: Settings
    verdicts: VerdictSource
    rooms: RoomCache
    subject: str
    rate_limiter: OriginRateLimiter

    @property
    def policy_key(self) -> Any:
        return self.identity.policy_key


GatewayFactory = Callable[..., Awaitable[Gateway]]


Decide = Callable[[Msg], "Verdict | dict[str, Any] | bytes | None"]


def allow(msg: Msg) -> Verdict:
    """A neutral verdict bound to the request's event ID and reference hash."""
    return verdict_for(msg, ContentClass.NEUTRAL)


def verdict_for(msg: Msg, content_class: ContentClass, harms: tuple[str, ...] = ()) -> Verdict:
    """A verdict for the request ``msg`` carries, as a filter worker would make it."""
    headers = msg.headers or {}
    return Verdict(
        event_id=headers[HEADER_EVENT_ID],
        content_class=content_class,
        harms=harms,
        community_id=headers.get(HEADER_COMMUNITY, ""),
        reference_hash=headers[HEADER_REFERENCE_HASH],
        first_seen_ts=int(time.time() * 1000),
        extra={"room_version": headers.get(HEADER_ROOM_VERSION, "")},
    )


@dataclass
class StandInWorker:
    """A NATS subscriber in the workers' queue group, answering with ``decide``'s verdict.

    ``decide`` returns a ``Verdict`` (sent as JSON), a dict or bytes (sent as they are),
    or None (no reply: the gateway times out). ``delay`` holds each new decision back.
    With ``redis``, verdicts are cached there and a cached verdict is answered at once
    without deciding again, as the real worker does. ``count`` is how many requests
    arrived; ``decided`` how many of them were decided.
    """

    nc: NATS
    subject: str
    decide: Decide = allow
    delay: float = 0.0
    redis: aioredis.Redis | None = None
    requests: list[Msg] = field(default_factory=list)
    decided: int = 0
    _sub: Subscription | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> StandInWorker:
        self._sub = await self.nc.subscribe(
            self.subject, queue=FILTER_WORKERS_QUEUE, cb=self._on_message
        )
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._tasks):
            task.cancel()

    @property
    def count(self) -> int:
        return len(self.requests)

    async def _on_message(self, msg: Msg) -> None:
        self.requests.append(msg)
        # Answer from a task so a delayed reply does not hold up other requests.
        task = asyncio.create_task(self._reply(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, msg: Msg) -> None:
        event_id = (msg.headers or {}).get(HEADER_EVENT_ID, "")
        if self.redis is not None and event_id:
            cached = await self.redis.get(redis_keys.verdict(event_id))
            if cached is not None:
                await msg.respond(cached)
                return
        if self.delay:
            await asyncio.sleep(self.delay)
        self.decided += 1
        answer = self.decide(msg)
        if answer is None:
            return
        if isinstance(answer, Verdict):
            data = answer.to_json()
            if self.redis is not None:
                await self.redis.set(redis_keys.verdict(answer.event_id), data, ex=3600)
        elif isinstance(answer, bytes):
            data = answer
        else:
            data = orjson.dumps(answer)
        await msg.respond(data)
