"""``warden sign-request``: ask a policy server to sign an event, as a test origin.

For trying ``/sign`` against a local gateway (``make run``) without a homeserver. The
command signs the request with X-Matrix as an origin server and prints the answer's
status and JSON body.

Unless ``--origin`` is given, the command also *is* that origin for the duration of the
request: it serves the origin's key document at ``https://127.0.0.1:<port>`` with a
throwaway self-signed certificate, and the origin's name is ``127.0.0.1:<port>``. The
gateway can then fetch the key only with these settings (development only):

    PS_DIRECT_KEY_FETCHING=true
    PS_FEDERATION_VERIFY_TLS=false
    PS_HOMESERVER_DENIED_NETWORKS=<the default list without 127.0.0.0/8 and ::1/128>
    PS_KEY_QUERY_SERVER=            # optional: no notary lookups for test origins

and the room must be protected (admin API ``PUT /api/v1/rooms/{roomId}``, or the
``rooms`` table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import socket
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.federation.server_key_document import build_server_key_document
from warden.federation.xmatrix import sign_request
from warden.matrix.canonical_json import encode_canonical_json, parse_canonical
from warden.matrix.event_hashes import add_content_hash, compute_event_id
from warden.matrix.event_signing import sign_event
from warden.matrix.keys import SigningKey, key_id_of, load_signing_key, random_key_version
from warden.matrix.room_versions import EventFormat, RoomVersion, get_room_version

DEFAULT_URL = "http://127.0.0.1:8080/_matrix/policy/v1/sign"

EPILOG = """\
Without --origin, the command serves the origin's key at https://127.0.0.1:<port> (a
self-signed certificate) while the request runs; the gateway then needs
PS_DIRECT_KEY_FETCHING=true, PS_FEDERATION_VERIFY_TLS=false and loopback removed from
PS_HOMESERVER_DENIED_NETWORKS (development only). The room must be protected.

examples:
  warden sign-request --build-event --room '!abc' --body-text hello
  warden sign-request --origin-key origin.key --origin hs.example --body event.json
"""


class UsageError(Exception):
    """Bad options; the message is shown to the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sign-request`` options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--url", default=DEFAULT_URL, help=f"endpoint (default {DEFAULT_URL})")
    parser.add_argument(
        "--origin-key", help="origin signing key in Synapse's format (default: a throwaway key)"
    )
    parser.add_argument(
        "--origin",
        help="origin server name (default: serve the key locally as 127.0.0.1:<port>)",
    )
    parser.add_argument(
        "--key-port", type=int, default=0, help="port for the local key server (default: any)"
    )
    parser.add_argument(
        "--destination",
        help="the policy server's name (default: read from its /_matrix/key/v2/server)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--body", help="file holding the PDU to send ('-' for stdin)")
    source.add_argument(
        "--build-event", action="store_true", help="build, hash and sign a PDU as the origin"
    )
    parser.add_argument(
        "--sign-event",
        action="store_true",
        help="with --body: set the sender's server to the origin, then hash and sign it",
    )
    parser.add_argument("--room", help="room ID (--build-event)")
    parser.add_argument("--room-version", default="12", help="room version (default 12)")
    parser.add_argument("--sender", help="sender (default @tester:<origin>)")
    parser.add_argument("--event-type", default="m.room.message", help="event type")
    parser.add_argument("--state-key", help="state key, for a state event")
    parser.add_argument("--body-text", default="hello", help="message text (--build-event)")
    parser.add_argument("--content", help="event content as JSON (instead of --body-text)")
    parser.add_argument("--save-event", help="write the event that was sent to this file")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the gateway's TLS certificate"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="request timeout (s)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="an extra request header, e.g. 'traceparent: 00-...-01' (repeatable)",
    )


def build_event(
    room_version: RoomVersion,
    *,
    room_id: str,
    sender: str,
    origin: str,
    signing_key: SigningKey,
    event_type: str = "m.room.message",
    content: dict[str, Any] | None = None,
    state_key: str | None = None,
    origin_server_ts: int | None = None,
) -> dict[str, Any]:
    """A PDU from ``origin``: hashed and signed with ``signing_key``."""
    now = origin_server_ts if origin_server_ts is not None else int(time.time() * 1000)
    event: dict[str, Any] = {
        "type": event_type,
        "room_id": room_id,
        "sender": sender,
        "content": content if content is not None else {},
        "origin_server_ts": now,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    if state_key is not None:
        event["state_key"] = state_key
    if room_version.event_format is EventFormat.V1_V2:
        event["event_id"] = f"${uuid.uuid4().hex}:{origin}"
    return sign_as_origin(room_version, event, origin, signing_key)


def sign_as_origin(
    room_version: RoomVersion, event: dict[str, Any], origin: str, signing_key: SigningKey
) -> dict[str, Any]:
    """Replace ``event``'s hashes and signatures with ``origin``'s; returns ``event``."""
    event.pop("hashes", None)
    event.pop("signatures", None)
    event.pop("unsigned", None)
    add_content_hash(event)
    sign_event(room_version, event, origin, signing_key, key_id_of(signing_key))
    return event


def _self_signed_certificate(directory: Path) -> tuple[str, str]:
    """Write a throwaway certificate for 127.0.0.1 and its key; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warden sign-request origin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "origin.pem", directory / "origin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals (Ctrl-C) to the command."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_origin_keys(signing_key: SigningKey, port: int = 0) -> AsyncIterator[str]:
    """Serve ``/_matrix/key/v2/server`` on https://127.0.0.1:<port>; yield the origin name."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    origin = f"127.0.0.1:{sock.getsockname()[1]}"

    async def keys(request: Request) -> Response:
        doc = build_server_key_document(origin, signing_key)
        return Response(orjson.dumps(doc), media_type="application/json")

    app = Starlette(routes=[Route("/_matrix/key/v2/server", keys, methods=["GET"])])
    with tempfile.TemporaryDirectory(prefix="warden-origin-") as tmp:
        certfile, keyfile = _self_signed_certificate(Path(tmp))
        config = uvicorn.Config(
            app,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = _QuietServer(config)
        # The gateway keeps its connection to this throwaway server alive, so closing it
        # always "exceeds" the graceful timeout: not worth a line on the user's terminal.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the origin key server did not start")
                await asyncio.sleep(0.01)
            yield origin
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            sock.close()


def _read_body(path: str) -> dict[str, Any]:
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        event = parse_canonical(raw)
    except ValueError as exc:
        raise UsageError(f"--body: not a valid Matrix JSON document: {exc}") from None
    if not isinstance(event, dict):
        raise UsageError("--body: the PDU must be a JSON object")
    return event


def _content(args: argparse.Namespace) -> dict[str, Any]:
    if args.content is None:
        return {"msgtype": "m.text", "body": args.body_text}
    try:
        content = parse_canonical(args.content)
    except ValueError as exc:
        raise UsageError(f"--content: not valid JSON: {exc}") from None
    if not isinstance(content, dict):
        raise UsageError("--content: must be a JSON object")
    return content


def _event_for(
    args: argparse.Namespace, origin: str, signing_key: SigningKey
) -> tuple[dict[str, Any], RoomVersion]:
    room_version = get_room_version(args.room_version)
    if args.build_event:
        if not args.room:
            raise UsageError("--build-event needs --room")
        event = build_event(
            room_version,
            room_id=args.room,
            sender=args.sender or f"@tester:{origin}",
            origin=origin,
            signing_key=signing_key,
            event_type=args.event_type,
            content=_content(args),
            state_key=args.state_key,
        )
        return event, room_version
    event = _read_body(args.body)
    if args.sign_event:
        # The origin can only sign for its own users (and v1/v2 event IDs).
        old = event.get("sender")
        has_localpart = isinstance(old, str) and old.startswith("@")
        localpart = old.partition(":")[0] if isinstance(old, str) and has_localpart else "@tester"
        event["sender"] = args.sender or f"{localpart}:{origin}"
        if room_version.event_format is EventFormat.V1_V2:
            event["event_id"] = f"${uuid.uuid4().hex}:{origin}"
        sign_as_origin(room_version, event, origin, signing_key)
    return event, room_version


async def _destination(client: httpx.AsyncClient, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    key_url = f"{parts.scheme}://{parts.netloc}/_matrix/key/v2/server"
    try:
        response = await client.get(key_url)
        name = response.json().get("server_name")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise UsageError(f"cannot read the server name from {key_url}: {exc}") from None
    if not isinstance(name, str):
        raise UsageError(f"{key_url} names no server; pass --destination")
    return name


async def send_signed_request(
    args: argparse.Namespace, signing_key: SigningKey, origin: str
) -> tuple[int, Any, dict[str, Any]]:
    """Build or read the event, send it signed as ``origin``; return status, body, event."""
    parts = urllib.parse.urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url: {args.url!r} is not an http(s) URL")
    uri = parts.path + (f"?{parts.query}" if parts.query else "")
    event, room_version = _event_for(args, origin, signing_key)
    extra_headers = _extra_headers(args.header)
    async with httpx.AsyncClient(verify=not args.insecure, timeout=args.timeout) as client:
        destination = args.destination or await _destination(client, args.url)
        authorization = sign_request(origin, destination, "POST", uri, event, signing_key)
        print(
            f"origin {origin}, event {compute_event_id(room_version, event)}"
            f" (room version {room_version.identifier})",
            file=sys.stderr,
        )
        response = await client.post(
            args.url,
            content=encode_canonical_json(event),
            headers={
                **extra_headers,
                "Authorization": authorization,
                "Content-Type": "application/json",
            },
        )
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body, event


def _extra_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header: {value!r} is not NAME:VALUE")
        headers[name.strip()] = content.strip()
    return headers


async def _run(args: argparse.Namespace) -> tuple[int, Any, dict[str, Any]]:
    if args.origin_key:
        signing_key = load_signing_key(args.origin_key)
    else:
        from signedjson.key import generate_signing_key

        # A fresh key version each run: a gateway that cached an earlier throwaway key
        # for a reused port looks the new one up instead of failing on the old one.
        signing_key = generate_signing_key(random_key_version())
    if args.origin:
        return await send_signed_request(args, signing_key, args.origin)
    async with serve_origin_keys(signing_key, args.key_port) as origin:
        return await send_signed_request(args, signing_key, origin)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``warden sign-request``; 0 on a 2xx answer, 1 otherwise, 2 on misuse.

    Prints ``HTTP <status>`` and the answer's JSON on stdout; ``--save-event`` keeps the
    event that was sent (to replay it with ``--body``, say).
    """
    from warden.matrix.keys import KeyFileError
    from warden.matrix.room_versions import UnknownRoomVersionError

    try:
        status, body, event = asyncio.run(_run(args))
    except (UsageError, KeyFileError, UnknownRoomVersionError) as exc:
        print(f"warden sign-request: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, OSError) as exc:
        print(f"warden sign-request: request failed: {exc}", file=sys.stderr)
        return 1
    if args.save_event:
        Path(args.save_event).write_bytes(orjson.dumps(event, option=orjson.OPT_INDENT_2))
    print(f"HTTP {status}")
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return 0 if 200 <= status < 300 else 1
