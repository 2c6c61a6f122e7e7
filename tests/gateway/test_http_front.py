"""The HTTP front of a real gateway process, probed with raw sockets (review H6, M7).

Each test starts ``warden gateway`` with short limits where it needs them and talks to
it the way an attacker would: a header line that never ends, a connection that sends
nothing or trickles, a body sent a byte at a time, more slow requests or connections
than the caps allow. What is asserted is behaviour (the status line, a closed socket,
a bounded number of bytes taken, the ``warden_http_rejected_total`` counter), never
how long anything took.
"""

from __future__ import annotations

import random
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.service_processes import ServiceProcess

pytestmark = pytest.mark.slow

SIGN = "/_matrix/policy/v1/sign"
# How long a test waits for the server to act at most (generous: the machine is shared).
PATIENCE = 20.0


def _start(spawn: Callable[..., ServiceProcess], **env: str) -> ServiceProcess:
    gateway = spawn("gateway", **env)
    gateway.wait_ready()
    return gateway


def _addr(gateway: ServiceProcess) -> tuple[str, int]:
    assert gateway.api_url is not None
    host, port = gateway.api_url.removeprefix("http://").split(":")
    return host, int(port)


@contextmanager
def _connect(gateway: ServiceProcess) -> Iterator[socket.socket]:
    sock = socket.create_connection(_addr(gateway), timeout=PATIENCE)
    try:
        yield sock
    finally:
        sock.close()


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or PATIENCE passes)."""
    sock.settimeout(PATIENCE)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def _read_one_response(sock: socket.socket) -> bytes:
    """One response (head and ``Content-Length`` body), the connection left open."""
    sock.settimeout(PATIENCE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"\r\ncontent-length: (\d+)", head, re.I)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _rejected(gateway: ServiceProcess, reason: str) -> float:
    text = httpx.get(f"{gateway.metrics_url}/metrics", timeout=10).text
    match = re.search(rf'^warden_http_rejected_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _send_until_answered(sock: socket.socket, head: bytes, filler: bytes, most: int) -> int:
    """Send ``head``, then ``filler`` until the server answers or ``most`` bytes went.

    Returns how many filler bytes were sent before the server's answer became readable.
    """
    sock.sendall(head)
    sent = 0
    while sent < most:
        readable, _, _ = select.select([sock], [], [], 0.02)
        if readable:
            return sent
        try:
            sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        sent += len(filler)
    readable, _, _ = select.select([sock], [], [], PATIENCE)
    return sent


def test_a_header_line_that_never_ends_gets_431_after_a_few_kib(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service)
    with _connect(gateway) as sock:
        head = f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nX-A: ".encode()
        sent = _send_until_answered(sock, head, b"a" * 4096, most=64 * 1024 * 1024)
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"errcode":"M_TOO_LARGE"' in answer
    # Answered after about PS_HTTP_MAX_HEADER_BYTES (16 KiB), not after 64 MiB.
    assert sent < 1024 * 1024
    assert _rejected(gateway, "headers_too_large") >= 1
    # The gateway still serves.
    r = httpx.get(f"{gateway.api_url}/_matrix/federation/v1/version", timeout=10)
    assert r.status_code == 200


def test_too_many_headers_get_431_and_a_long_url_gets_414(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service, PS_HTTP_MAX_HEADERS="20", PS_HTTP_MAX_URL_BYTES="1024")
    with _connect(gateway) as sock:
        headers = "".join(f"X-H{i}: v\r\n" for i in range(30))
        sock.sendall(f"GET /_matrix/federation/v1/version HTTP/1.1\r\n{headers}\r\n".encode())
        assert _read_response(sock).startswith(b"HTTP/1.1 431 ")
    with _connect(gateway) as sock:
        target = "/_matrix/federation/v1/version?" + "a" * 2000
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        assert _read_response(sock).startswith(b"HTTP/1.1 414 ")
    # Within the limits the same requests are served.
    with _connect(gateway) as sock:
        headers = "".join(f"X-H{i}: v\r\n" for i in range(10))
        sock.sendall(
            f"GET /_matrix/federation/v1/version?a=1 HTTP/1.1\r\n{headers}"
            "Connection: close\r\n\r\n".encode()
        )
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
    assert _rejected(gateway, "too_many_headers") == 1
    assert _rejected(gateway, "url_too_long") == 1


def test_silent_and_trickling_connections_are_closed_after_the_header_deadline(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service, PS_HTTP_HEADER_TIMEOUT_SECONDS="1")
    with _connect(gateway) as silent, _connect(gateway) as trickle:
        # One sends nothing; the other a byte of its request line now and then, never
        # finishing its headers.
        trickle.sendall(b"G")
        request = f"ET {SIGN} HTTP/1.1\r\nHost: gw\r\nX-Slow: ".encode() + b"a" * 1000
        sent = 0
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            readable, _, _ = select.select([trickle], [], [], 0.2)
            if readable:
                break
            trickle.sendall(request[sent : sent + 1])
            sent += 1
        assert _read_response(trickle).startswith(b"HTTP/1.1 408 ")
        assert sent < len(request)  # it was cut off before finishing
        assert _read_response(silent) == b""  # closed without an answer
    assert _rejected(gateway, "header_timeout") == 2


def test_a_body_trickle_is_cut_after_the_body_deadline(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service, PS_HTTP_BODY_TIMEOUT_SECONDS="1")
    with _connect(gateway) as sock:
        sock.sendall(
            f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            "Content-Length: 60000\r\n\r\n{".encode()
        )
        sent = 1
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
            sock.sendall(b" ")
            sent += 1
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert sent < 60000
    assert _rejected(gateway, "body_timeout") == 1


def test_requests_over_the_concurrency_cap_get_503_with_retry_after(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    cap = 3
    gateway = _start(spawn_service, PS_HTTP_MAX_CONCURRENCY=str(cap))
    slow: list[socket.socket] = []
    try:
        # ``cap`` requests whose bodies never finish keep the app busy.
        for _ in range(cap):
            sock = socket.create_connection(_addr(gateway), timeout=PATIENCE)
            sock.sendall(
                f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{{".encode()
            )
            slow.append(sock)
        # The next one is refused at once, without reaching the app.
        refused = False
        deadline = time.monotonic() + PATIENCE
        while not refused and time.monotonic() < deadline:
            with _connect(gateway) as sock:
                sock.sendall(
                    b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: gw\r\n"
                    b"Connection: close\r\n\r\n"
                )
                answer = _read_response(sock)
            # The slow requests' tasks may not all have started yet: ask again.
            refused = answer.startswith(b"HTTP/1.1 503 ")
        assert refused, answer[:300]
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nretry-after: 1" in head
        assert b'"errcode":"M_UNKNOWN"' in answer
        assert _rejected(gateway, "overloaded") >= 1
    finally:
        for sock in slow:
            sock.close()
    # Once they are gone, requests are served again.
    deadline = time.monotonic() + PATIENCE
    status = 0
    while status != 200 and time.monotonic() < deadline:
        status = httpx.get(f"{gateway.api_url}/_matrix/federation/v1/version").status_code
    assert status == 200


def test_connections_over_the_cap_get_503_and_are_closed(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service, PS_HTTP_MAX_CONNECTIONS="3")
    idle = [socket.create_connection(_addr(gateway), timeout=PATIENCE) for _ in range(3)]
    try:
        with _connect(gateway) as extra:
            answer = _read_response(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        assert _rejected(gateway, "too_many_connections") == 1
    finally:
        for sock in idle:
            sock.close()


def test_health_endpoints_are_only_on_the_metrics_listener(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service)
    for path in ("/readyz", "/livez"):
        assert httpx.get(f"{gateway.api_url}{path}", timeout=10).status_code == 404
        assert httpx.get(f"{gateway.metrics_url}{path}", timeout=10).status_code == 200


# --- before authentication (review H7, H8) ---

SEND = "/_matrix/federation/v1/send/txn1"
INVITE = "/_matrix/federation/v2/invite/!room:example.org/$event"
# Keys are fetched directly; loopback stays denied, so a lookup fails at once.
NO_NOTARY = {"PS_KEY_QUERY_SERVER": "", "PS_DIRECT_KEY_FETCHING": "true"}


def _answer_before_the_body(
    gateway: ServiceProcess, method: str, path: str, authorization: str | None
) -> tuple[bytes, int]:
    """Send a chunked 8 MiB body (never finished); return the answer and bytes sent."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{auth}\r\n"
    ).encode()
    piece = b"[{},{},{},{},{},{},{},{}]," * 160
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    with _connect(gateway) as sock:
        sent = _send_until_answered(sock, head + b'4\r\n {"x\r\n', chunk, most=8 * 1024 * 1024)
        return _read_one_response(sock), sent


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", SEND), ("PUT", INVITE)], ids=["send", "invite"]
)
def test_unauthenticated_send_and_invite_are_refused_before_the_body_is_read(
    spawn_service: Callable[..., ServiceProcess], method: str, path: str
) -> None:
    gateway = _start(spawn_service, **NO_NOTARY)
    for authorization in (
        None,  # no Authorization at all
        'X-Matrix origin="bad name!",key="ed25519:a",sig="AA"',  # malformed
        'X-Matrix origin="127.0.0.1:9",key="ed25519:a",sig="AA"',  # key cannot be had
    ):
        answer, sent = _answer_before_the_body(gateway, method, path, authorization)
        assert answer.startswith(b"HTTP/1.1 401 "), (authorization, answer[:300])
        assert b'"errcode":"M_UNAUTHORIZED"' in answer
        # The answer came while the client was still sending its 8 MiB.
        assert sent < 8 * 1024 * 1024


def test_5000_x_matrix_headers_get_401_without_any_key_lookup(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    # The HTTP front would refuse 5000 headers (431): raise its caps to reach the check.
    gateway = _start(
        spawn_service,
        PS_HTTP_MAX_HEADERS="10000",
        PS_HTTP_MAX_HEADER_BYTES="4000000",
        **NO_NOTARY,
    )
    headers = "".join(
        f'Authorization: X-Matrix origin="r{i}.evil.test",key="ed25519:k{i}",sig="AA"\r\n'
        for i in range(5000)
    )
    with _connect(gateway) as sock:
        sock.sendall(
            f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n{headers}"
            "Connection: close\r\n\r\n{}".encode()
        )
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    assert b"more than 4 X-Matrix headers" in answer
    metrics = httpx.get(f"{gateway.metrics_url}/metrics", timeout=10).text
    assert not re.search(r"^warden_key_fetches_total\{", metrics, re.M)


def test_key_fetches_caused_by_one_client_are_budgeted(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    # Review H8: junk X-Matrix headers naming ever new origins make the gateway fetch
    # keys; one client address gets PS_KEY_FETCHES_PER_CLIENT_PER_MINUTE fetches, then
    # 401 without a fetch.
    gateway = _start(spawn_service, PS_KEY_FETCHES_PER_CLIENT_PER_MINUTE="3", **NO_NOTARY)
    port = random.randrange(1024, 65000)  # fresh names: nothing in the negative cache
    with httpx.Client(base_url=gateway.api_url, timeout=10) as client:
        for n in range(8):
            auth = f'X-Matrix origin="127.0.0.{n + 2}:{port}",key="ed25519:a",sig="AA"'
            r = client.post(SIGN, content=b"{}", headers={"Authorization": auth})
            assert r.status_code == 401, r.text
            assert r.json()["errcode"] == "M_UNAUTHORIZED"
    metrics = httpx.get(f"{gateway.metrics_url}/metrics", timeout=10).text
    fetched = re.search(
        r'^warden_key_fetches_total\{outcome="error",source="direct"\} (\S+)$', metrics, re.M
    )
    refused = re.search(
        r'^warden_key_fetches_refused_total\{reason="client_budget"\} (\S+)$', metrics, re.M
    )
    assert fetched and float(fetched.group(1)) == 3
    assert refused and float(refused.group(1)) == 5


def test_a_connection_answered_before_its_body_does_not_stay_open_idle(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    # /send answers 401 before reading the body; the client then sends the body and
    # nothing more. uvicorn's keep-alive timer was cancelled by those bytes: without the
    # front's deadline the connection would stay open for good.
    gateway = _start(spawn_service, PS_HTTP_HEADER_TIMEOUT_SECONDS="1")
    with _connect(gateway) as sock:
        sock.sendall(f"PUT {SEND} HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n".encode())
        answer = _read_one_response(sock)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        sock.sendall(b"{}")
        assert _read_response(sock) == b""  # closed by the server, not by PATIENCE
    assert _rejected(gateway, "header_timeout") == 1


def test_an_upgrade_request_is_answered_as_plain_http(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(spawn_service)
    with _connect(gateway) as sock:
        sock.sendall(
            b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        answer = _read_one_response(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_an_address_failing_authentication_past_the_limit_is_refused(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    # Junk /sign bodies (refused before authentication) and unauthenticated /send, both
    # counted for the client address; past PS_HTTP_AUTH_FAILURE_LIMIT its connections
    # are answered 429 and closed as they open. 127.0.0.2: not a trusted proxy. (The
    # kernel drop is off: its test is the next one.)
    gateway = _start(
        spawn_service,
        PS_HTTP_AUTH_FAILURE_LIMIT="4",
        PS_HTTP_AUTH_FAILURE_KERNEL_DROP="false",
        **NO_NOTARY,
    )
    host, port = _addr(gateway)

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(PATIENCE)
        sock.bind(("127.0.0.2", 0))
        sock.connect((host, port))
        return sock

    sock = connect()
    try:
        for request in (
            f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\n\x00\x01\x02",
            f"POST {SIGN} HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n[]",
            f"PUT {SEND} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n",
        ):
            sock.sendall(request.encode("latin-1"))
            answer = _read_one_response(sock)
            assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 401 ")), answer[:200]
        # The fourth failure: answered, then the connection is closed.
        sock.sendall(f"PUT {SEND} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n".encode())
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    finally:
        sock.close()
    sock = connect()
    try:
        answer = _read_response(sock)  # nothing sent: answered as it opened
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
    assert b"M_LIMIT_EXCEEDED" in answer
    assert _rejected(gateway, "penalised") == 2
    # Others are served as before.
    assert httpx.get(f"{gateway.api_url}/_matrix/key/v2/server", timeout=10).status_code == 200
    # Failures through a trusted proxy (127.0.0.1, uvicorn's default) count against no
    # one: not the proxy, nor the address its X-Forwarded-For names (which anyone can
    # write), who connecting directly afterwards is served.
    with httpx.Client(base_url=gateway.api_url, timeout=10) as client:
        for _ in range(8):
            r = client.put(SEND, content=b"{}", headers={"X-Forwarded-For": "127.0.0.9"})
            assert r.status_code == 401, r.text
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(PATIENCE)
    try:
        sock.bind(("127.0.0.9", 0))
        sock.connect((host, port))
        sock.sendall(b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _read_one_response(sock).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
    assert _rejected(gateway, "penalised") == 2


def _metric(gateway: ServiceProcess, name: str) -> float:
    text = httpx.get(f"{gateway.metrics_url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_penalised_address_is_dropped_by_the_kernel_until_its_penalty_ends(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = _start(
        spawn_service,
        PS_HTTP_AUTH_FAILURE_LIMIT="3",
        PS_HTTP_AUTH_FAILURE_PENALTY_SECONDS="3",
        **NO_NOTARY,
    )
    host, port = _addr(gateway)

    def connect(source: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    with connect("127.0.0.2", PATIENCE) as sock:
        for _ in range(3):
            sock.sendall(f"PUT {SEND} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n".encode())
            assert _read_one_response(sock).startswith(b"HTTP/1.1 401 ")
    assert _metric(gateway, "warden_http_kernel_dropped_clients") == 1
    # The open connection was closed after its answer (as without the kernel drop).
    assert _rejected(gateway, "penalised") == 1
    # New connection attempts go unanswered: the kernel drops them, nothing reaches the
    # HTTP front (which would have answered 429).
    with pytest.raises(TimeoutError):
        connect("127.0.0.2", 1.0)
    assert _rejected(gateway, "penalised") == 1
    # Other addresses are served as before.
    with connect("127.0.0.3", PATIENCE) as sock:
        sock.sendall(b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _read_one_response(sock).startswith(b"HTTP/1.1 200 ")
    # When the penalty ends the filter goes, and the address is served again.
    deadline = time.monotonic() + PATIENCE
    while _metric(gateway, "warden_http_kernel_dropped_clients") != 0:
        assert time.monotonic() < deadline, "the filter outlived the penalty"
        time.sleep(0.1)
    with connect("127.0.0.2", PATIENCE) as sock:
        sock.sendall(b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _read_one_response(sock).startswith(b"HTTP/1.1 200 ")
