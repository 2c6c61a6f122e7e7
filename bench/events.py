"""The benchmark's traffic, built and signed before any timed window.

* ``OriginKeys``: the simulated origin homeservers. Their names are ``127.0.0.1:<port>``
  (the server name is the address its key server listens on) and each has its own
  ed25519 federation key.
* ``EventFactory`` builds realistic PDUs of 0.5 to 4 KiB (messages with and without
  HTML, reactions) across room versions, hashed and signed by the sender's server with
  the product's own ``warden.matrix`` functions.
* ``RequestFile`` collects raw HTTP/1.1 requests (``POST /_matrix/policy/v1/sign`` with
  an X-Matrix ``Authorization`` header made by ``warden.federation.xmatrix``) and writes
  them in the format ``bench/wrk/sign.lua`` reads: bodies are stored once, so the
  thirty-odd requests of one event in a spam wave share its body.

The file format (all numbers ASCII decimal)::

    WRKREQ1 <n_bodies> <n_requests>\\n
    n_requests times: <body index, 0-based> <head length>\\n<head bytes>
    n_bodies times:   <body length>\\n<body bytes>
"""

from __future__ import annotations

import base64
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from signedjson.key import generate_signing_key

from warden.federation.xmatrix import sign_request
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.event_hashes import add_content_hash, compute_event_id
from warden.matrix.event_signing import sign_event
from warden.matrix.keys import SigningKey, verify_key_base64
from warden.matrix.room_versions import get_room_version

SIGN_PATH = "/_matrix/policy/v1/sign"
GATEWAY_NAME = "warden.bench"
# Room versions rooms are created in, with weights: most traffic is in recent rooms.
ROOM_VERSIONS: tuple[tuple[str, int], ...] = (("6", 1), ("9", 1), ("10", 3), ("11", 3), ("12", 4))
MIN_PDU_BYTES = 512
MAX_PDU_BYTES = 4096
# Keyword the bench community refuses (workload 3); never appears in neutral bodies.
PROHIBITED_KEYWORD = "wardenbenchforbidden"

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "matrix",
    "room",
    "server",
    "policy",
    "event",
    "sign",
    "federation",
    "hello",
    "world",
    "meeting",
    "tomorrow",
    "lunch",
    "coffee",
    "release",
    "notes",
    "build",
    "test",
    "deploy",
    "review",
    "merge",
    "branch",
    "update",
    "thanks",
    "great",
    "idea",
    "please",
    "look",
    "issue",
    "ticket",
    "weekend",
    "plans",
    "photo",
    "link",
    "article",
    "read",
    "later",
    "agree",
    "disagree",
    "maybe",
    "sure",
    "soon",
]


@dataclass(frozen=True)
class Origin:
    """One simulated homeserver: its name (``127.0.0.1:<port>``) and federation key."""

    name: str
    key: SigningKey

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.key.version}"

    @property
    def port(self) -> int:
        return int(self.name.rpartition(":")[2])

    def seed_b64(self) -> str:
        """The key's seed (for the key server process)."""
        return base64.b64encode(bytes(self.key)).decode()


def new_origin_keys(count: int) -> list[SigningKey]:
    """``count`` fresh origin keys (names are assigned once their ports are known)."""
    return [generate_signing_key("b" + os.urandom(4).hex()) for _ in range(count)]


@dataclass(frozen=True)
class BenchRoom:
    """A protected room of the benchmark."""

    room_id: str
    room_version: str


def make_rooms(count: int, rng: random.Random) -> list[BenchRoom]:
    """``count`` room IDs spread over ``ROOM_VERSIONS`` (at least one of each)."""
    versions = [v for v, _ in ROOM_VERSIONS]
    weights = [w for _, w in ROOM_VERSIONS]
    chosen = versions[:count] + rng.choices(versions, weights, k=max(0, count - len(versions)))
    rooms = []
    for version in chosen:
        if get_room_version(version).room_ids_as_hashes:
            opaque = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
            room_id = f"!{opaque}"
        else:
            room_id = f"!{os.urandom(9).hex()}:bench.example"
        rooms.append(BenchRoom(room_id, version))
    return rooms


def _event_ref(rng: random.Random) -> str:
    return "$" + base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")


def _text(rng: random.Random, n_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_bytes:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


@dataclass
class EventFactory:
    """Builds signed PDUs. ``rng`` makes runs reproducible apart from keys and times."""

    rooms: Sequence[BenchRoom]
    rng: random.Random = field(default_factory=random.Random)
    _counter: int = 0

    def event(
        self,
        sender_origin: Origin,
        *,
        room: BenchRoom | None = None,
        sender_localpart: str | None = None,
        keyword: bool = False,
        kind: str | None = None,
        media: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """A PDU sent by a user of ``sender_origin``; returns it and its event ID.

        ``kind``: "message" (plain), "html" (with ``formatted_body``) or "reaction";
        random when None. ``keyword`` puts the prohibited keyword in a message body.
        """
        rng = self.rng
        room = room or rng.choice(self.rooms)
        version = get_room_version(room.room_version)
        self._counter += 1
        if kind is None:
            kind = rng.choices(("message", "html", "reaction"), (6, 3, 1))[0]
        if keyword and kind == "reaction":
            kind = "message"
        localpart = sender_localpart or f"user{rng.randrange(5000)}"
        now = int(time.time() * 1000)
        event: dict[str, Any] = {
            "room_id": room.room_id,
            "sender": f"@{localpart}:{sender_origin.name}",
            "origin_server_ts": now - rng.randrange(2000),
            "depth": 1000 + self._counter,
            "prev_events": [_event_ref(rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))],
            "auth_events": [_event_ref(rng) for _ in range(rng.choice((3, 4)))],
        }
        if media is not None:  # an image message: ``media`` is its mxc URI
            event["type"] = "m.room.message"
            event["content"] = {
                "msgtype": "m.image",
                "body": "image.png",
                "url": media,
                "info": {"mimetype": "image/png", "size": 60, "w": 64, "h": 64},
            }
        elif kind == "reaction":
            event["type"] = "m.reaction"
            event["content"] = {
                "m.relates_to": {
                    "rel_type": "m.annotation",
                    "event_id": _event_ref(rng),
                    "key": rng.choice(("👍", "🎉", "❤️", "😄", "+1")),
                }
            }
        else:
            # Aim the whole PDU at MIN..MAX bytes: about 900 bytes are not the body.
            target = rng.randint(MIN_PDU_BYTES, MAX_PDU_BYTES)
            body_bytes = max(16, target - 900)
            if kind == "html":
                body_bytes //= 2
            body = _text(rng, body_bytes)
            if keyword:
                body = f"{body[:40]} {PROHIBITED_KEYWORD} {body[40:]}"
            content: dict[str, Any] = {"msgtype": "m.text", "body": body}
            if kind == "html":
                content["format"] = "org.matrix.custom.html"
                content["formatted_body"] = f"<p>{body}</p>"
            event["type"] = "m.room.message"
            event["content"] = content
        add_content_hash(event)
        key_id = sender_origin.key_id
        sign_event(version, event, sender_origin.name, sender_origin.key, key_id)
        event["unsigned"] = {"age_ts": now}
        return event, str(compute_event_id(version, event))


@dataclass
class RequestFile:
    """Raw /sign requests for the load generator, bodies stored once."""

    destination: str = GATEWAY_NAME
    bodies: list[bytes] = field(default_factory=list)
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    # What each request is, for the results: "neutral", "keyword", "hellban_follow_up".
    kinds: dict[str, int] = field(default_factory=dict)

    def add_body(self, event: dict[str, Any]) -> int:
        """Store ``event`` as a body; return its index.

        Bodies are canonical JSON, as Synapse sends every federation request body
        (``MatrixFederationHttpClient`` encodes with ``encode_canonical_json``).
        """
        self.bodies.append(encode_canonical_json(event))
        return len(self.bodies) - 1

    def add_request(self, body_index: int, event: dict[str, Any], asker: Origin, kind: str) -> None:
        """A request by ``asker`` for the event stored at ``body_index``."""
        auth = sign_request(asker.name, self.destination, "POST", SIGN_PATH, event, asker.key)
        body = self.bodies[body_index]
        head = (
            f"POST {SIGN_PATH} HTTP/1.1\r\n"
            "Host: warden.bench\r\n"
            f"Authorization: {auth}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.requests.append((body_index, head))
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def body_sizes(self) -> list[int]:
        """The size of each stored body (bytes)."""
        return [len(b) for b in self.bodies]

    def write(self, path: Path) -> None:
        """Write the file ``bench/wrk/sign.lua`` (and the Python load generator) read."""
        with open(path, "wb") as f:
            f.write(f"WRKREQ1 {len(self.bodies)} {len(self.requests)}\n".encode())
            for index, head in self.requests:
                f.write(f"{index} {len(head)}\n".encode())
                f.write(head)
            for body in self.bodies:
                f.write(f"{len(body)}\n".encode())
                f.write(body)


def read_request_file(path: Path) -> list[bytes]:
    """Every request of a file written by ``RequestFile.write``, as raw bytes."""
    with open(path, "rb") as f:
        magic, n_bodies, n_requests = f.readline().split()
        if magic != b"WRKREQ1":
            raise ValueError(f"{path} is not a request file")
        heads: list[tuple[int, bytes]] = []
        for _ in range(int(n_requests)):
            index, length = f.readline().split()
            heads.append((int(index), f.read(int(length))))
        bodies = [f.read(int(f.readline())) for _ in range(int(n_bodies))]
    return [head + bodies[index] for index, head in heads]


# --- workloads ---


def unique_requests(
    factory: EventFactory, origins: Sequence[Origin], count: int, out: RequestFile
) -> None:
    """``count`` distinct neutral events, each asked for once by its sender's server."""
    for _ in range(count):
        sender = factory.rng.choice(origins)
        event, _ = factory.event(sender)
        out.add_request(out.add_body(event), event, sender, "neutral")


def image_requests(
    factory: EventFactory,
    origins: Sequence[Origin],
    count: int,
    out: RequestFile,
    *,
    media_server: str,
    media_per_event: float = 0.5,
    bad_share: float = 0.05,
) -> None:
    """``count`` distinct image messages, each asked for once by its sender's server.

    Their media come from a pool of ``count * media_per_event`` (so about half the
    events reuse media another event already had scanned); ``bad_share`` of the pool is
    in the local HMA's ``csam`` bank. Kinds: ``image_clean``, ``image_bad``. The first
    request is always a bad one, so that a short window (the quick run on a busy machine
    sends a few dozen) still has a refusal to show.
    """
    rng = factory.rng
    run = os.urandom(4).hex()  # media IDs unique to this window: nothing cached before
    pool = max(1, int(count * media_per_event))
    for i in range(count):
        n = 0 if i == 0 else rng.randrange(pool)
        bad = n < pool * bad_share
        tag = f"{'bad' if bad else 'ok'}{run}x{n}"
        sender = rng.choice(origins)
        event, _ = factory.event(sender, media=f"mxc://{media_server}/img-{tag}")
        out.add_request(out.add_body(event), event, sender, "image_bad" if bad else "image_clean")


def fresh_image_events(
    factory: EventFactory, origins: Sequence[Origin], count: int, *, media_server: str
) -> list[tuple[Origin, dict[str, Any]]]:
    """``count`` image messages, each with clean media no other event has (each one a
    scan of its own), with the origin that sends and asks for it."""
    rng = factory.rng
    run = os.urandom(4).hex()
    out = []
    for n in range(count):
        sender = rng.choice(origins)
        event, _ = factory.event(sender, media=f"mxc://{media_server}/img-slow{run}x{n}")
        out.append((sender, event))
    return out


ANTISPAM_PATH = "/_warden/antispam/v1/check_event_for_spam"
# What synapse-http-antispam leaves out of an event (the client format).
_FEDERATION_ONLY = ("auth_events", "prev_events", "depth", "hashes", "signatures")


def antispam_requests(
    factory: EventFactory, origin: Origin, count: int, out: RequestFile, token: str
) -> None:
    """``count`` distinct local events of ``origin`` (the homeserver), as
    synapse-http-antispam POSTs them to ``check_event_for_spam``: the client format
    with ``event_id``, ``Authorization: Bearer <community token>``. One in ten carries
    the prohibited keyword, each from a new spammer (hellbanned by it: the origin's
    ordinary users, whom later windows use, stay unbanned)."""
    for n in range(count):
        keyword = n % 10 == 0
        localpart = f"antispammer{n}x{os.urandom(3).hex()}" if keyword else None
        event, event_id = factory.event(
            origin, sender_localpart=localpart, keyword=keyword, kind="message"
        )
        local = {k: v for k, v in event.items() if k not in _FEDERATION_ONLY}
        local["event_id"] = event_id
        out.bodies.append(orjson.dumps({"event": local}))
        body = out.bodies[-1]
        head = (
            f"POST {ANTISPAM_PATH} HTTP/1.1\r\n"
            "Host: warden.bench\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.requests.append((len(out.bodies) - 1, head))
        kind = "keyword" if keyword else "neutral"
        out.kinds[kind] = out.kinds.get(kind, 0) + 1


def spam_wave_requests(
    factory: EventFactory,
    origins: Sequence[Origin],
    n_events: int,
    out: RequestFile,
    *,
    min_askers: int = 20,
    max_askers: int = 50,
    group_size: int = 25,
) -> int:
    """Events each asked for by ``min_askers``..``max_askers`` different origins.

    Events come in groups of ``group_size`` whose requests are shuffled together, so
    every event's asks arrive within a fraction of a second of each other at the
    rates measured (a spam wave landing in a busy room). Returns the request count.
    """
    rng = factory.rng
    before = len(out.requests)
    for start in range(0, n_events, group_size):
        batch: list[tuple[int, dict[str, Any], Origin]] = []
        for _ in range(min(group_size, n_events - start)):
            sender = rng.choice(origins)
            event, _ = factory.event(sender, kind=rng.choice(("message", "html")))
            index = out.add_body(event)
            k = rng.randint(min_askers, min(max_askers, len(origins)))
            askers = rng.sample(list(origins), k)
            batch.extend((index, event, asker) for asker in askers)
        rng.shuffle(batch)
        for index, event, asker in batch:
            out.add_request(index, event, asker, "spam_wave")
    return len(out.requests) - before


def mixed_requests(
    factory: EventFactory,
    origins: Sequence[Origin],
    count: int,
    out: RequestFile,
    *,
    keyword_share: float = 0.10,
    follow_up_share: float = 0.05,
    follow_up_gap: int = 200,
) -> None:
    """Distinct events: mostly neutral, ``keyword_share`` with the prohibited keyword
    (each from a new spammer, who is then hellbanned), and ``follow_up_share`` innocent
    messages from spammers ``follow_up_gap`` or more requests after their offence,
    refused because of the hellban. Every event is asked for by its sender's server.
    """
    rng = factory.rng
    pending: list[tuple[int, Origin, str]] = []  # (due position, origin, localpart), in order
    follow_up_chance = follow_up_share / keyword_share if keyword_share > 0 else 0.0
    keyword_chance = keyword_share / max(1e-9, 1.0 - follow_up_share)
    n_spammers = 0
    for position in range(count):
        if pending and pending[0][0] <= position:
            _, sender, localpart = pending.pop(0)
            event, _ = factory.event(sender, sender_localpart=localpart, kind="message")
            kind = "hellban_follow_up"
        elif rng.random() < keyword_chance:
            sender = rng.choice(origins)
            n_spammers += 1
            localpart = f"spammer{n_spammers}x{os.urandom(3).hex()}"
            event, _ = factory.event(sender, sender_localpart=localpart, keyword=True)
            if rng.random() < follow_up_chance:
                pending.append((position + follow_up_gap, sender, localpart))
            kind = "keyword"
        else:
            sender = rng.choice(origins)
            event, _ = factory.event(sender)
            kind = "neutral"
        out.add_request(out.add_body(event), event, sender, kind)


def warmup_requests(
    factory: EventFactory, origins: Iterable[Origin]
) -> list[tuple[Origin, dict[str, Any]]]:
    """One neutral event per origin (fills each gateway's keyring before timing)."""
    return [(origin, factory.event(origin)[0]) for origin in origins]


def origin_key_table(origins: Iterable[Origin]) -> dict[str, dict[str, str]]:
    """``{server_name: {key_id: verify key base64}}`` (for the crypto floor)."""
    return {o.name: {o.key_id: verify_key_base64(o.key)} for o in origins}
