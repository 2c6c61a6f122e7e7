"""Bounds on what one HTTP client can make a listener hold, before any app code runs.

uvicorn's httptools protocol, as it comes, concatenates the request line and header
values without limit until the headers end, arms no timer before the first response
(a connection that never finishes its headers is never closed), reads a body for as
long as the client takes, and accepts every connection. ``LimitedHttpToolsProtocol``
(the coalescing protocol of ``http_writes`` plus these bounds) closes each of those
doors (review H6):

* the request target is at most ``PS_HTTP_MAX_URL_BYTES`` (414), the header block at
  most ``PS_HTTP_MAX_HEADER_BYTES`` and ``PS_HTTP_MAX_HEADERS`` fields (431). A header
  line that never ends is caught by counting the bytes received while the head is
  incomplete, so memory stays bounded by a few KiB plus one socket read;
* the head must arrive within ``PS_HTTP_HEADER_TIMEOUT_SECONDS`` of the connection (or,
  on a kept-alive connection, of the request's first byte), the body within
  ``PS_HTTP_BODY_TIMEOUT_SECONDS`` of the head (408, then the connection is closed);
* at most ``PS_HTTP_MAX_CONCURRENCY`` requests are handled at once per listener; the
  next one is answered 503 with ``Retry-After`` without reaching the app;
* at most ``PS_HTTP_MAX_CONNECTIONS`` connections are open per listener; the next one
  is answered 503 and closed;
* an address penalised for failing authentication (``client_penalties``) is answered
  429 and closed as its connections open, and its open connections are closed after
  their current response.

Deadlines cost no timer per request: each connection notes when its current phase
began (one ``loop.time()`` per phase), and one task per listener sweeps the open
connections a few times per deadline (``sweep_deadlines``). Per request the hot path
pays a length check per URL fragment and per header, and one ``len`` for the
concurrency cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httptools
import orjson
from prometheus_client import Counter, Gauge
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from warden.runtime.client_penalties import PEER_SCOPE_KEY, ClientPenalties
from warden.runtime.http_writes import CoalescingHttpToolsProtocol
from warden.settings import Settings

logger = logging.getLogger(__name__)

HTTP_REJECTED = Counter(
    "warden_http_rejected_total",
    "Requests or connections refused by the HTTP front before reaching the app, by reason: "
    "url_too_long (414), headers_too_large and too_many_headers (431), header_timeout and "
    "body_timeout (408 or closed), overloaded (503, PS_HTTP_MAX_CONCURRENCY), "
    "too_many_connections (503 and closed, PS_HTTP_MAX_CONNECTIONS), penalised (429 and "
    "closed: an address that failed authentication past PS_HTTP_AUTH_FAILURE_LIMIT).",
    ["reason"],
)
HTTP_OPEN_CONNECTIONS = Gauge(
    "warden_http_open_connections",
    "Open HTTP connections per listener (as of the last deadline sweep).",
    ["listener"],
)

# Bound children: no label lookup on the paths that count.
_REJECTED = {
    reason: HTTP_REJECTED.labels(reason)
    for reason in (
        "url_too_long",
        "headers_too_large",
        "too_many_headers",
        "header_timeout",
        "body_timeout",
        "overloaded",
        "too_many_connections",
        "penalised",
    )
}

# Seconds a client is told to wait after a 503 from the front.
RETRY_AFTER_SECONDS = 1
# How long a refused connection is kept half-closed, its input read and dropped, so that
# the answer is not lost to a reset (``_close_lingering``).
LINGER_SECONDS = 1.0
# The request line around the target: method, spaces, "HTTP/1.1", CRLF.
_REQUEST_LINE_SLACK = 64

# Connection phases.
_HEAD = 0  # waiting for, or reading, a request's line and headers
_BODY = 1  # headers done, body still arriving
_APP = 2  # request read; the app is answering
_IDLE = 3  # answered; uvicorn's keep-alive timer runs

_REASONS = {
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The bounds one listener enforces (see the module docstring)."""

    max_url_bytes: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 64
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_concurrency: int = 1024
    max_connections: int = 10000
    # Addresses refused for failing authentication (the gateway's; None: none).
    penalties: ClientPenalties | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        """The limits the ``PS_HTTP_*`` settings name."""
        return cls(
            max_url_bytes=settings.http_max_url_bytes,
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            header_timeout_seconds=settings.http_header_timeout_seconds,
            body_timeout_seconds=settings.http_body_timeout_seconds,
            max_concurrency=settings.http_max_concurrency,
            max_connections=settings.http_max_connections,
        )

    @property
    def sweep_interval(self) -> float:
        """How often deadlines are checked: a deadline is overrun by at most this."""
        shortest = min(self.header_timeout_seconds, self.body_timeout_seconds)
        return max(0.05, min(1.0, shortest / 4))


def _error_body(errcode: str, error: str) -> bytes:
    return orjson.dumps({"errcode": errcode, "error": error})


def _raw_response(
    status: int, errcode: str, error: str, *, retry_after: bool = False, retry_after_s: int = 0
) -> bytes:
    """A complete ``Connection: close`` response with a Matrix error body."""
    body = _error_body(errcode, error)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
    ]
    if retry_after or retry_after_s:
        head.append(b"retry-after: %d\r\n" % (retry_after_s or RETRY_AFTER_SECONDS))
    return b"".join(head) + b"\r\n" + body


_OVERLOADED_BODY = _error_body(
    "M_UNKNOWN", "Too many requests in progress on this server; retry shortly"
)
_OVERLOADED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(_OVERLOADED_BODY)),
    (b"retry-after", b"%d" % RETRY_AFTER_SECONDS),
]


async def overloaded_app(scope: Scope, receive: Receive, send: Send) -> None:
    """503 ``M_UNKNOWN`` with ``Retry-After``: the listener's concurrency cap is reached."""
    await send({"type": "http.response.start", "status": 503, "headers": _OVERLOADED_HEADERS})
    await send({"type": "http.response.body", "body": _OVERLOADED_BODY})


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request the front refuses."""


class LimitedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol (one write per response) with the front's bounds.

    ``limits`` is set on a subclass per listener (``protocol_class``).
    """

    limits: ClassVar[HttpLimits] = HttpLimits()
    _trusted: ClassVar[tuple[bool, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._phase_started = 0.0
        self._head_bytes = 0  # received while the current head is incomplete
        self._header_bytes = 0
        self._begun = 0  # requests begun on this connection
        self._reject_status = 0
        self._reject_reason = ""
        self._closed_by_front = False
        # The peer's address when penalties may refuse it (not a trusted proxy's).
        self._penalisable: str | None = None

    # --- connection ---

    def _trusted_proxy(self, host: str) -> bool:
        """Whether ``host`` is a trusted proxy (uvicorn's ``FORWARDED_ALLOW_IPS``)."""
        cls = type(self)
        trusted = cls.__dict__.get("_trusted")
        if trusted is None:  # parsed once per listener
            trusted = trusted_proxy_networks(self.config.forwarded_allow_ips)
            cls._trusted = trusted
        everyone, networks = trusted
        if everyone:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Serve the connection, or answer and close it: 503 past the connection cap, 429
        from a penalised address."""
        super().connection_made(transport)
        self._phase_started = self.loop.time()
        if len(self.connections) > self.limits.max_connections:
            _REJECTED["too_many_connections"].inc()
            self._closed_by_front = True
            self.transport.write(
                _raw_response(
                    503, "M_UNKNOWN", "Too many connections; retry shortly", retry_after=True
                )
            )
            self.transport.close()
            return
        penalties = self.limits.penalties
        if penalties is None or self.client is None or self._trusted_proxy(self.client[0]):
            return
        self._penalisable = self.client[0]
        left = penalties.penalised(self._penalisable)
        if left:
            _REJECTED["penalised"].inc()
            self._closed_by_front = True
            self.transport.write(_penalised_response(left))
            self._close_lingering()
            # Not even read: what it sends (a 4 MiB body, say) stays in the kernel until
            # the close. Its answer went first; a reset after it costs a penalised
            # client at most that answer.
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; refuse a head that grows past its bounds."""
        if self._closed_by_front:
            return
        self._unset_keepalive_if_required()
        phase_before = self._phase
        begun_before = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # As uvicorn: no WebSocket here (the apps serve none).
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._reject_status:
                self._refuse(self._reject_status, self._reject_reason)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._phase != _HEAD or self._begun == 0:
            return
        # The head is still incomplete: count what it has taken so far. A chunk that
        # began in the middle of a previous request (pipelining) is not counted: the
        # undercount is at most one socket read.
        if self._begun == begun_before:
            self._head_bytes += len(data)
        elif self._begun == begun_before + 1 and (phase_before == _IDLE or begun_before == 0):
            self._head_bytes = len(data)  # the chunk starts with this request
        limit = len(self.url) + self.limits.max_header_bytes + _REQUEST_LINE_SLACK
        if self._head_bytes > limit:
            self._refuse(431, "headers_too_large")

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        """A request starts: its head phase (and deadline) starts unless already running."""
        super().on_message_begin()
        if self._penalisable is not None:
            # A direct connection: its failures count towards its peer's penalty.
            self.scope[PEER_SCOPE_KEY] = self._penalisable  # type: ignore[literal-required]
        self._begun += 1
        if self._begun > 1:  # the first request's head is timed from the connection
            self._phase_started = self.loop.time()
        self._phase = _HEAD
        self._head_bytes = 0
        self._header_bytes = 0

    # on_url and on_header are uvicorn's, inlined (a super() call per header costs
    # about as much as the checks), with the checks added.

    def on_url(self, url: bytes) -> None:
        """Collect the request target; refuse it past ``max_url_bytes`` (414)."""
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            self._reject(414, "url_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header; refuse past ``max_headers`` or ``max_header_bytes`` (431)."""
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject(431, "headers_too_large")
        headers = self.headers
        if len(headers) >= self.limits.max_headers:
            self._reject(431, "too_many_headers")
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Start the body deadline; past the concurrency cap, answer 503 instead of the app."""
        self._phase = _BODY
        self._phase_started = self.loop.time()
        if len(self.tasks) >= self.limits.max_concurrency:
            _REJECTED["overloaded"].inc()
            app = self.app
            self.app = overloaded_app
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The whole request is in: no deadline of ours while the app answers."""
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # Answered before its body was in (say a 401 before reading): uvicorn's
            # keep-alive timer was cancelled by the body's bytes, so the connection is
            # idle with no timer; the header deadline closes it if no request follows.
            self._phase = _IDLE
            self._phase_started = self.loop.time()
        else:
            self._phase = _APP

    def on_response_complete(self) -> None:
        """Answered: idle until the next request (uvicorn's keep-alive timer)."""
        penalties = self.limits.penalties
        if (
            penalties is not None
            and penalties.active
            and self._penalisable is not None
            and penalties.penalised(self._penalisable)
        ):
            # Penalised since it connected: this answer is its last.
            self.server_state.total_requests += 1
            _REJECTED["penalised"].inc()
            self._closed_by_front = True
            self._close_lingering()
            return
        pipelined = bool(self.pipeline)  # a request queued behind: it runs next
        super().on_response_complete()
        if self._phase == _APP and not pipelined:
            self._phase = _IDLE

    # --- deadlines ---

    def check_deadline(self, now: float) -> None:
        """Close the connection if its head or body is overdue (called by the sweep)."""
        if self._closed_by_front:
            return
        if self._phase == _HEAD:
            if now - self._phase_started > self.limits.header_timeout_seconds:
                self._time_out("header_timeout", partial=self._begun > 0)
        elif self._phase == _BODY:
            # Reading paused means the app is not consuming yet (or a pipelined request
            # waits): not the client's delay.
            if self.flow is not None and self.flow.read_paused:
                return
            if now - self._phase_started > self.limits.body_timeout_seconds:
                self._time_out("body_timeout", partial=True)
        elif self._phase == _IDLE and self.timeout_keep_alive_task is None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return
            if now - self._phase_started > self.limits.header_timeout_seconds:
                _REJECTED["header_timeout"].inc()
                self._closed_by_front = True
                self.transport.close()

    def _time_out(self, reason: str, *, partial: bool) -> None:
        _REJECTED[reason].inc()
        if partial:
            self._refuse(408, None, counted=True)
        else:  # nothing was sent: just close, as for an idle keep-alive connection
            self._closed_by_front = True
            self.transport.close()

    # --- refusing ---

    def _reject(self, status: int, reason: str) -> None:
        self._reject_status = status
        self._reject_reason = reason
        raise _Rejected(reason)

    def _refuse(self, status: int, reason: str | None, *, counted: bool = False) -> None:
        """Answer ``status`` (unless a response is under way) and close the connection."""
        if reason is not None and not counted:
            _REJECTED[reason].inc()
        self._closed_by_front = True
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        if answering and cycle.response_started:
            pass  # a response is half written: closing is all that is left
        else:
            if answering:
                # The app is reading this request's body: it sees a disconnect, and
                # whatever it sends is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
            messages = {
                408: "Request not received in time",
                414: "Request target too long",
                431: "Request headers too large or too many",
            }
            errcode = "M_UNKNOWN" if status == 408 else "M_TOO_LARGE"
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, errcode, messages[status]))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Close after the answer, without losing it to a reset.

        Closing a socket with unread request bytes in its receive buffer (the rest of an
        oversized head) makes the kernel send a reset, which can reach the client before
        it read the answer. So the write side is shut first (the client sees the answer,
        then the end), what still arrives is read and dropped (``data_received`` ignores
        it), and the socket is closed ``LINGER_SECONDS`` later at the latest.
        """
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()  # TLS: no half-close
            return
        transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, transport.close)


def _penalised_response(seconds_left: float) -> bytes:
    return _raw_response(
        429,
        "M_LIMIT_EXCEEDED",
        "Too many failed authentications from this address; retry later",
        retry_after_s=max(1, int(seconds_left + 0.999)),
    )


def trusted_proxy_networks(
    forwarded_allow_ips: str | list[str] | None,
) -> tuple[bool, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    """uvicorn's ``FORWARDED_ALLOW_IPS`` as (every address trusted, trusted networks).

    Entries that are not IP addresses or networks (Unix socket names) are left out."""
    if forwarded_allow_ips is None:
        return False, ()
    entries = (
        forwarded_allow_ips.split(",")
        if isinstance(forwarded_allow_ips, str)
        else list(forwarded_allow_ips)
    )
    networks = []
    for entry in (e.strip() for e in entries):
        if entry == "*":
            return True, ()
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return False, tuple(networks)


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A ``LimitedHttpToolsProtocol`` subclass enforcing ``limits`` (one per listener)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


async def sweep_deadlines(state: ServerState, limits: HttpLimits, listener: str) -> None:
    """Check every open connection's deadline every ``limits.sweep_interval``; forever."""
    loop = asyncio.get_running_loop()
    gauge = HTTP_OPEN_CONNECTIONS.labels(listener)
    while True:
        await asyncio.sleep(limits.sweep_interval)
        now = loop.time()
        connections = list(state.connections)
        gauge.set(len(connections))
        for conn in connections:
            check = getattr(conn, "check_deadline", None)
            if check is not None:
                try:
                    check(now)
                except Exception:  # one broken connection must not stop the sweep
                    logger.exception("deadline check failed")
