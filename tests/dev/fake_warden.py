"""A stand-in for the `warden` CLI, used to test `warden dev` without the real services.

It honours the same contract as the real one:

* ``migrate``: connects to ``PS_DATABASE`` and round-trips a row (proving the URL works);
* ``keygen``: writes both key files if missing;
* a service name: serves ``/livez``, ``/readyz`` and ``/metrics`` on
  ``PS_HTTP_METRICS_BIND`` (the gateway also serves ``PS_HTTP_BIND``), and exits 0 on
  SIGTERM.

Test knobs: ``FAKE_WARDEN_PIDS`` (a file each service appends "<service> <pid>" to),
``FAKE_WARDEN_CHECK_BUS`` (check ``PS_NATS_URL`` and ``PS_REDIS_URL`` answer at start),
``FAKE_WARDEN_CRASH`` (services that exit 3 at once) and ``FAKE_WARDEN_IGNORE_TERM``
(services that ignore SIGTERM).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _bind(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path in ("/livez", "/readyz", "/metrics", "/_matrix/key/v2/server"):
            body = b"ok\n"
            self.send_response(200)
        else:
            body = b"not found\n"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def _migrate() -> None:
    import asyncpg

    conn = await asyncpg.connect(os.environ["PS_DATABASE"], timeout=5)
    try:
        # A temporary table: a real round trip that leaves nothing behind in a shared DB.
        await conn.execute("CREATE TEMP TABLE fake_migrations (n serial primary key)")
        await conn.execute("INSERT INTO fake_migrations DEFAULT VALUES")
        assert await conn.fetchval("SELECT count(*) FROM fake_migrations") == 1
    finally:
        await conn.close()


async def _check_bus() -> None:
    import nats
    import redis.asyncio as aioredis

    nc = await nats.connect(os.environ["PS_NATS_URL"], allow_reconnect=False)
    await nc.jetstream().account_info()
    await nc.close()
    client = aioredis.Redis.from_url(os.environ["PS_REDIS_URL"])
    await client.ping()
    await client.aclose()


def main() -> int:
    command = sys.argv[1]
    if command == "migrate":
        asyncio.run(_migrate())
        print("migrations applied")
        return 0
    if command == "keygen":
        for var in ("PS_HOMESERVER_SIGNING_KEY_PATH", "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH"):
            path = Path(os.environ[var])
            if not path.exists():
                path.write_text("ed25519 a_fake fakekey\n")
                print(f"wrote {path}")
        return 0
    if command in os.environ.get("FAKE_WARDEN_CRASH", "").split(","):
        print(f"{command} crashing on purpose")
        return 3
    if os.environ.get("FAKE_WARDEN_CHECK_BUS"):
        asyncio.run(_check_bus())
    pids = os.environ.get("FAKE_WARDEN_PIDS")
    if pids:
        with open(pids, "a") as f:
            f.write(f"{command} {os.getpid()}\n")
    binds = [os.environ["PS_HTTP_METRICS_BIND"]]
    if command == "gateway":
        binds.append(os.environ["PS_HTTP_BIND"])
    servers = [ThreadingHTTPServer(_bind(b), Handler) for b in binds]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"{command} listening on {', '.join(binds)}", flush=True)
    done = threading.Event()
    if command in os.environ.get("FAKE_WARDEN_IGNORE_TERM", "").split(","):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    for server in servers:
        server.shutdown()
    print(f"{command} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
