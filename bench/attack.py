"""The attacker of the ``under_attack`` window: one origin flooding the gateway.

Three attack classes, each from its own concurrent loop with its own connections, all
bounded in request count and time and sent only to the gateway on loopback:

* ``junk``: unauthenticated requests: no ``Authorization``, a malformed X-Matrix
  header, a wrong scheme, a pile of X-Matrix headers; bodies that are random bytes,
  truncated JSON or not an object; to ``/sign`` and ``/send``.
* ``made_up_origins``: well-formed X-Matrix headers naming a new server per request
  whose keys cannot be fetched, with a plausible PDU (``/sign``) or transaction
  (``/send``) and a random signature. The names are IP literals ``127.a.b.c:port``:
  an IP literal needs no DNS lookup or well-known request, so the gateway's key fetch
  goes to loopback, where the attacker holds the ports bound but not listening, and
  every connection is refused at once. Nothing leaves the machine: every server name
  anywhere in the attack's traffic (headers, PDU senders, transaction origins) is such a
  name, so that whatever a gateway looks up, it needs no DNS.
* ``oversized``: ``PUT /send`` with a body of several MiB and no valid authentication
  (half no header, half a made-up origin), sent in chunks; a new connection each,
  because the gateway may answer (and close) before the body is all sent.

Every request is built before the loops start; the loops only write pre-built bytes
and read the answer's status line and length, so the attacker's CPU stays small
compared with the gateway's. Connections come from ``source`` (``127.0.0.2`` by
default), another loopback address than the legitimate load's, so that a per-address
defence can tell them apart.

``python -m bench.attack SPEC OUT``: ``SPEC`` is a JSON file (``AttackPlan.to_json``);
the process builds its requests, reserves its ports, prints ``ready`` on stdout, runs
for ``duration`` seconds at most and writes its counters to ``OUT`` as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

SIGN_PATH = "/_matrix/policy/v1/sign"
SEND_PREFIX = "/_matrix/federation/v1/send/"
CLASSES = ("junk", "made_up_origins", "oversized")
# Bytes written per call when sending an oversized body: small enough to notice an early
# answer soon, large enough to keep the attacker's system calls few.
CHUNK_BYTES = 256 * 1024
# Bound on waiting for one answer (the window is short; a hung request counts as timeout).
ANSWER_TIMEOUT_SECONDS = 10.0
# Bound on a connection attempt: an address the gateway penalised gets no answer to its
# attempts at all (its packets are dropped by the kernel), and an attacker gives up on
# an attempt soon to try again (counted as a connect error).
CONNECT_TIMEOUT_SECONDS = 1.0


@dataclass
class AttackPlan:
    """What the attacker process does (all of it set by the harness)."""

    target: str  # "127.0.0.1:<port>": the gateway's listener
    destination: str  # the gateway's server name, for X-Matrix and Host
    duration: float  # seconds of flooding, from ``ready``
    source: str = "127.0.0.2"
    max_requests: int = 200_000  # per small class (junk, made-up origins)
    max_oversized: int = 1000
    connections: int = 16  # per small class
    oversized_connections: int = 4
    oversized_bytes: int = 4 * 1024 * 1024
    distinct_made_up: int = 50_000  # distinct made-up origins before they repeat
    reserved_ports: int = 4
    seed: int = 4284

    def to_json(self) -> bytes:
        """As written to the spec file."""
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> AttackPlan:
        """Read a spec file's content."""
        return cls(**orjson.loads(raw))


# --- request shapes ---


def _head(method: str, path: str, destination: str, length: int, auth: Sequence[str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {destination}"]
    lines += [f"Authorization: {a}" for a in auth]
    lines += ["Content-Type: application/json", f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _xmatrix(origin: str, destination: str, key: str, sig: str) -> str:
    return f'X-Matrix origin="{origin}",destination="{destination}",key="{key}",sig="{sig}"'


def _txn_id(rng: random.Random) -> str:
    return f"atk{rng.getrandbits(64):016x}"


def _pdu(rng: random.Random, sender_server: str) -> dict[str, Any]:
    """A PDU that looks like a message (its hashes and signatures are random)."""
    ref = "$" + _b64(rng.randbytes(32)).replace("+", "-").replace("/", "_")
    room = "!" + _b64(rng.randbytes(32)).replace("+", "-").replace("/", "_")
    return {
        "room_id": room,
        "sender": f"@user{rng.randrange(10_000)}:{sender_server}",
        "type": "m.room.message",
        "origin_server_ts": int(time.time() * 1000),
        "depth": rng.randrange(1, 100_000),
        "prev_events": [ref],
        "auth_events": [ref, ref],
        "content": {"msgtype": "m.text", "body": "hello " * rng.randrange(5, 60)},
        "hashes": {"sha256": _b64(rng.randbytes(32))},
        "signatures": {sender_server: {"ed25519:a": _b64(rng.randbytes(64))}},
    }


def junk_requests(
    rng: random.Random, count: int, destination: str, ports: Sequence[int]
) -> list[tuple[str, bytes]]:
    """``count`` unauthenticated requests as ``(kind, raw bytes)``, kinds in turn. Any
    server name in them is a made-up loopback name (``made_up_name``)."""
    shapes = (
        "sign_no_auth_random_bytes",
        "sign_malformed_xmatrix_truncated_json",
        "sign_wrong_scheme_not_object",
        "sign_xmatrix_missing_sig_not_json",
        "sign_many_xmatrix_headers",
        "send_no_auth_random_bytes",
        "send_malformed_xmatrix_truncated_json",
    )
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        kind = shapes[i % len(shapes)]
        path = SIGN_PATH if kind.startswith("sign") else SEND_PREFIX + _txn_id(rng)
        method = "POST" if kind.startswith("sign") else "PUT"
        auth: list[str] = []
        if kind.endswith("random_bytes"):
            body = rng.randbytes(rng.randrange(64, 2048))
        elif kind.endswith("truncated_json"):
            whole = orjson.dumps({"pdus": [_pdu(rng, made_up_name(rng, ports))]})
            body = whole[: rng.randrange(1, len(whole) - 1)]
            auth = [rng.choice(('X-Matrix origin="', "X-Matrix ,,,=", 'X-Matrix sig="x'))]
        elif kind.endswith("not_object"):
            body = b"[1,2,3]"
            auth = ["Bearer " + _b64(rng.randbytes(24))]
        elif kind.endswith("not_json"):
            body = b"not json at all " * rng.randrange(1, 32)
            origin = made_up_name(rng, ports)
            auth = [f'X-Matrix origin="{origin}",destination="{destination}"']
        else:  # many X-Matrix headers, each malformed in its own way
            origin = made_up_name(rng, ports)
            body = orjson.dumps(_pdu(rng, origin))
            auth = [f'X-Matrix origin="{origin}",key="ed25519:{j}",sig=' for j in range(50)]
        out.append((kind, _head(method, path, destination, len(body), auth) + body))
    return out


def made_up_name(rng: random.Random, ports: Sequence[int]) -> str:
    """A server name nobody serves: ``127.a.b.c:port`` (never ``127.0.0.x``: the
    harness's own servers listen on 127.0.0.1) with one of the attacker's reserved
    ports, so that a key fetch is refused at once, on loopback."""
    a, b, c = rng.randrange(1, 255), rng.randrange(0, 256), rng.randrange(1, 255)
    return f"127.{a}.{b}.{c}:{rng.choice(ports)}"


def made_up_origin_requests(
    rng: random.Random, count: int, destination: str, ports: Sequence[int]
) -> list[tuple[str, bytes]]:
    """``count`` requests each signed (with a random signature) by a new made-up origin:
    ``/sign`` with a PDU, and ``/send`` with a one-PDU transaction, in turn."""
    out: list[tuple[str, bytes]] = []
    pdus = [orjson.dumps(_pdu(rng, made_up_name(rng, ports))) for _ in range(16)]
    for i in range(count):
        origin = made_up_name(rng, ports)
        key = f"ed25519:{rng.getrandbits(32):08x}"
        sig = _b64(rng.randbytes(64))
        auth = _xmatrix(origin, destination, key, sig)
        if i % 2 == 0:
            kind, method, path, body = "sign", "POST", SIGN_PATH, pdus[i % len(pdus)]
        else:
            kind, method, path = "send", "PUT", SEND_PREFIX + _txn_id(rng)
            body = b'{"origin":"%s","origin_server_ts":%d,"pdus":[%s]}' % (
                origin.encode(),
                int(time.time() * 1000),
                pdus[i % len(pdus)],
            )
        out.append((kind, _head(method, path, destination, len(body), [auth]) + body))
    return out


def oversized_body(size: int, origin: str) -> bytes:
    """A ``size``-byte body shaped like a transaction from ``origin`` (one huge message
    body)."""
    start = b'{"origin":"%s","pdus":[{"content":{"body":"' % origin.encode()
    end = b'"}}]}'
    return start + b"A" * max(0, size - len(start) - len(end)) + end


def oversized_heads(
    rng: random.Random, count: int, destination: str, size: int, ports: Sequence[int]
) -> list[tuple[str, bytes]]:
    """Heads of ``count`` ``PUT /send`` requests announcing ``size`` bytes: half without
    authentication, half with a made-up origin's X-Matrix header."""
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        path = SEND_PREFIX + _txn_id(rng)
        if i % 2 == 0:
            out.append(("no_auth", _head("PUT", path, destination, size, [])))
        else:
            origin = made_up_name(rng, ports)
            sig = _b64(rng.randbytes(64))
            auth = _xmatrix(origin, destination, "ed25519:a", sig)
            out.append(("made_up_origin", _head("PUT", path, destination, size, [auth])))
    return out


# --- counters ---


@dataclass
class ClassStats:
    """What one attack class did."""

    requests: int = 0  # requests started
    answered: int = 0  # requests that got an HTTP answer
    statuses: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "closed": 0, "timeout": 0, "cut_at_end": 0}
    )
    connections_opened: int = 0
    bytes_sent: int = 0
    # Oversized class: answers that came before the whole body was sent.
    answered_before_body_sent: int = 0
    duration_s: float = 0.0

    def count_status(self, status: str) -> None:
        """One answer with ``status``."""
        self.answered += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def to_json(self) -> dict[str, Any]:
        """As stored in the results file."""
        doc = asdict(self)
        doc["statuses"] = dict(sorted(self.statuses.items()))
        doc["rps"] = round(self.requests / self.duration_s, 1) if self.duration_s else 0.0
        return doc


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """Read one HTTP/1.1 answer; return its status and whether the server keeps the
    connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    length: int | None = None
    keep = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    if length is None:
        await reader.read()  # until the server closes
        return status, False
    await reader.readexactly(length)
    return status, keep


class Attacker:
    """The three loops of one attack (see the module docstring)."""

    def __init__(self, plan: AttackPlan, ports: Sequence[int]) -> None:
        self.plan = plan
        self.source: str | None = plan.source or None
        rng = random.Random(plan.seed)  # noqa: S311 (traffic, not secrets)
        self.host, _, port = plan.target.rpartition(":")
        self.port = int(port)
        self.small: dict[str, list[tuple[str, bytes]]] = {
            "junk": junk_requests(rng, min(plan.max_requests, 7 * 500), plan.destination, ports),
            "made_up_origins": made_up_origin_requests(
                rng, min(plan.max_requests, plan.distinct_made_up), plan.destination, ports
            ),
        }
        self.big_heads = oversized_heads(
            rng, plan.max_oversized, plan.destination, plan.oversized_bytes, ports
        )
        self.big_body = memoryview(oversized_body(plan.oversized_bytes, made_up_name(rng, ports)))
        self.stats = {name: ClassStats() for name in CLASSES}

    async def _connect(
        self, stats: ClassStats
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        stats.connections_opened += 1
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            if self.source is not None:
                try:
                    return await asyncio.open_connection(
                        self.host, self.port, local_addr=(self.source, 0)
                    )
                except OSError as exc:
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    # Only 127.0.0.1 is usable here: come from it, like the legitimate load.
                    self.source = None
            return await asyncio.open_connection(self.host, self.port)

    async def _small_connection(self, name: str, stop_at: float) -> None:
        """One connection's loop for a small class: write, read the answer, repeat."""
        stats, requests = self.stats[name], self.small[name]
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while time.monotonic() < stop_at and stats.requests < self.plan.max_requests:
            if writer is None:
                try:
                    reader, writer = await self._connect(stats)
                except OSError:
                    stats.errors["connect"] += 1
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            kind, raw = requests[stats.requests % len(requests)]
            stats.requests += 1
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            keep = False
            try:
                writer.write(raw)
                stats.bytes_sent += len(raw)
                async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                    status, keep = await read_answer(reader)
                stats.count_status(status)
            except TimeoutError:
                stats.errors["timeout"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                stats.errors["closed"] += 1
            if not keep:
                writer.close()
                writer = reader = None
        if writer is not None:
            writer.close()

    async def _oversized_connection(self, stop_at: float) -> None:
        """Oversized bodies, one connection each, answers watched while sending."""
        stats, plan = self.stats["oversized"], self.plan
        while time.monotonic() < stop_at and stats.requests < plan.max_oversized:
            kind, head = self.big_heads[stats.requests % len(self.big_heads)]
            stats.requests += 1
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            try:
                reader, writer = await self._connect(stats)
            except OSError:
                stats.errors["connect"] += 1
                await asyncio.sleep(0.05)
                continue
            answer = asyncio.ensure_future(read_answer(reader))
            sent, cut = 0, False
            try:
                writer.write(head)
                while sent < len(self.big_body) and not answer.done():
                    if time.monotonic() >= stop_at:
                        cut = True  # the window is over: don't wait for this one
                        break
                    chunk = self.big_body[sent : sent + CHUNK_BYTES]
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    stats.bytes_sent += len(chunk)
                    # drain() does not yield while the socket takes everything: let
                    # the reader see an early answer.
                    await asyncio.sleep(0)
            except OSError:
                pass  # the gateway closed the connection; it may have answered first
            try:
                if cut and not answer.done():
                    stats.errors["cut_at_end"] += 1
                    continue
                async with asyncio.timeout(ANSWER_TIMEOUT_SECONDS):
                    status, _ = await answer
                stats.count_status(status)
                if sent < len(self.big_body):
                    stats.answered_before_body_sent += 1
            except TimeoutError:
                stats.errors["timeout"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                stats.errors["closed"] += 1
            finally:
                if not answer.done():
                    answer.cancel()
                with contextlib.suppress(BaseException):
                    await answer
                writer.close()

    async def run(self) -> dict[str, Any]:
        """Flood for ``plan.duration`` seconds (or until every class hits its cap)."""
        plan = self.plan
        start = time.monotonic()
        stop_at = start + plan.duration

        async def timed(name: str, loops: list[Any]) -> None:
            await asyncio.gather(*loops)
            self.stats[name].duration_s = time.monotonic() - start

        await asyncio.gather(
            *(
                timed(
                    name, [self._small_connection(name, stop_at) for _ in range(plan.connections)]
                )
                for name in self.small
            ),
            timed(
                "oversized",
                [self._oversized_connection(stop_at) for _ in range(plan.oversized_connections)],
            ),
        )
        return {name: s.to_json() for name, s in self.stats.items()}


def reserve_ports(count: int) -> list[socket.socket]:
    """Bind ``count`` ports on every address without listening: a connection to any
    ``127.x.y.z`` at one of them is refused (RST) at once."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("0.0.0.0", 0))  # never listens: connections are refused
        socks.append(sock)
    return socks


def main(argv: list[str]) -> int:
    """Build, announce ``ready``, flood, write the counters."""
    plan = AttackPlan.from_json(Path(argv[0]).read_bytes())
    held = reserve_ports(plan.reserved_ports)
    ports = [int(s.getsockname()[1]) for s in held]
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover (uvloop is a dependency)
        runner = asyncio.Runner()
    with runner:
        attacker = Attacker(plan, ports)
        print("ready", flush=True)
        try:
            stats = runner.run(asyncio.wait_for(attacker.run(), plan.duration + 30))
        except TimeoutError:  # a loop stuck past its bounds: report what was done
            stats = {name: s.to_json() for name, s in attacker.stats.items()}
    out = {"classes": stats, "reserved_ports": ports, "source": attacker.source or "127.0.0.1"}
    Path(argv[1]).write_bytes(orjson.dumps(out))
    for sock in held:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
