"""``python -m bench.nats_request``: the requester's CPU per NATS request, nats-py's
``Client.request`` against ``warden.bus.request_reply.Requester``.

What the gateway pays to ask the filter workers about each new event, without the rest
of the stack: a responder process answers every request at once, and 32 concurrent
requesters in this process send the evaluation request's six headers and a 1.5 KB body
(uvloop, as the services run). The two are measured alternately, ``ROUNDS`` times each,
and the mean of this process's CPU time per request is printed for each. Needs the NATS
server at ``BENCH_NATS_URL`` (default ``nats://127.0.0.1:4222``); ``BENCH_QUICK=1`` makes
it tiny (the smoke test).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from warden.bus.request_reply import Requester

QUICK = os.environ.get("BENCH_QUICK") == "1"  # the smoke test's tiny run
ROUNDS = 1 if QUICK else 3
CONCURRENCY = 32
PER_REQUESTER = 5 if QUICK else 300
BODY = b"x" * 1500
HEADERS = {
    "Warden-Room-Version": "11",
    "Warden-Community": "default",
    "Warden-Origin": "127.0.0.1:40001",
    "Warden-Event-Id": "$" + "a" * 43,
    "Warden-Source": "sign",
    "Warden-Reference-Hash": "b" * 43,
}


def _url() -> str:
    return os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")


async def _respond(subject: str) -> None:
    nc = await nats.connect(_url())

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"class":"neutral"}')

    await nc.subscribe(subject, queue="bench", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await nc.close()


async def _cpu_per_request(ask: Callable[[], Awaitable[object]]) -> float:
    async def requester() -> None:
        for _ in range(PER_REQUESTER):
            await ask()

    for _ in range(100):
        await ask()
    start = time.process_time()
    await asyncio.gather(*(requester() for _ in range(CONCURRENCY)))
    return (time.process_time() - start) / (CONCURRENCY * PER_REQUESTER)


async def _compare(subject: str) -> dict[str, list[float]]:
    nc: NATS = await nats.connect(_url())
    requester = Requester(nc)

    async def library() -> object:
        return await nc.request(subject, BODY, timeout=5, headers=HEADERS)

    async def ours() -> object:
        return await requester.request(subject, BODY, timeout_seconds=5, headers=HEADERS)

    results: dict[str, list[float]] = {"Client.request": [], "Requester": []}
    for _ in range(ROUNDS):
        results["Client.request"].append(await _cpu_per_request(library))
        results["Requester"].append(await _cpu_per_request(ours))
    await requester.close()
    await nc.close()
    return results


def main() -> None:
    """Start the responder, compare, print µs of CPU per request."""
    if sys.argv[1:2] == ["respond"]:
        uvloop.run(_respond(sys.argv[2]))
        return
    subject = f"bench.request_reply.{uuid.uuid4().hex[:8]}"
    responder = subprocess.Popen(  # noqa: S603 (this module, run again as the responder)
        [sys.executable, "-m", "bench.nats_request", "respond", subject],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if responder.stdout is None or responder.stdout.readline().strip() != "ready":
            raise SystemExit("the responder did not start")
        results = uvloop.run(_compare(subject))
    finally:
        if responder.stdin is not None:
            responder.stdin.close()
        responder.wait(timeout=10)
    for name, values in results.items():
        runs = ", ".join(f"{v * 1e6:.1f}" for v in values)
        print(f"{name}: {statistics.mean(values) * 1e6:.1f} µs CPU per request ({runs})")


if __name__ == "__main__":
    main()
