"""Issue 16: faults under load. Kill any process, restart any server, and nothing is
lost, flipped or done twice.

Two gateways, two filter workers, the moderator and the webhooks service run as real
processes under ``warden dev``'s supervisor, on a NATS (JetStream), a Redis and a
PostgreSQL owned by this test (so it may restart them), with three origin homeservers
(HTTPS key servers), a homeserver client API and a webhook target as local servers.
While steady /sign and /send traffic flows, every kind of fault is injected once per
round, one at a time, at random moments: SIGKILL of each service process, SIGSTOP of a
worker for longer than an evaluation claim lives, restarts of NATS, Redis and
PostgreSQL, and a homeserver (client API, and the federation API of the moderation
bot's server) and a webhook target that hold their answers past the services' timeout
or shed requests with 503. Then the checks of
``load_and_faults.check`` run and the figures table is printed.

Knobs (``make faults`` sets a longer run): ``WARDEN_FAULTS_ROUNDS`` (rounds of every
fault, default 1), ``WARDEN_FAULTS_SEED`` (random seed, default random; printed),
``WARDEN_FAULTS_RATE`` (requests per second, default 20), ``WARDEN_FAULTS_REPORT``
(a file the table is also written to).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from signedjson.key import get_verify_key
from unpaddedbase64 import encode_base64

from tests.faults.fault_stack import FaultStack
from tests.faults.faulty_answers import FaultyAnswers
from tests.faults.load_and_faults import (
    KEYWORD,
    ROOM_VERSION,
    Faults,
    Figures,
    Traffic,
    check,
    fault_plan,
    settle,
)
from tests.faults.private_servers import PrivateServers
from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.gateway.conftest import DENIED_WITHOUT_LOOPBACK, start_origin  # noqa: F401
from tests.gateway.policy_harness import Origin
from tests.moderator.conftest import FakeClientAPI, fake_client_api, http_server  # noqa: F401
from tests.moderator.federation_destination import Destination, Keyring
from tests.webhooks.conftest import (  # noqa: F401
    WebhookReceiver,
    https_target,
    receiver,
    webhook_ca,
    webhook_ca_file,
)
from warden.matrix.keys import key_id_of, load_signing_key

ROUNDS = int(os.environ.get("WARDEN_FAULTS_ROUNDS", "1"))
RATE = float(os.environ.get("WARDEN_FAULTS_RATE", "20"))
API_KEY = "faults-admin-key"
MODERATOR = "@mod:hs.test"
CLAIM_TTL = 3.0  # PS_EVALUATION_CLAIM_TTL_SECONDS; the pause outlasts it
SERVICE_HTTP_TIMEOUT = 2.0  # the moderator's and webhooks' timeout; delays exceed it


async def configure(api_url: str, room_id: str, webhook_url: str, bot: str) -> None:
    """A community that refuses ``KEYWORD``, reports to the webhook and sends commands
    to the moderation bot ``bot``; its room, and the room's moderator (whose token the
    moderator service has)."""
    admin = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=admin) as api:
        r = await api.post("/api/v1/communities/new", json={"name": "Faults"})
        assert r.status_code == 200, r.text
        community = r.json()["community_id"]
        r = await api.post(
            f"/api/v1/communities/{community}/config",
            json={
                "keyword_filter_keywords": [KEYWORD],
                "webhook_url": webhook_url,
                "moderation_bot_user_id": bot,
            },
        )
        assert r.status_code == 200, r.text
        r = await api.put(
            f"/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
            json={"room_version": ROOM_VERSION, "community_id": community},
        )
        assert r.status_code == 200, r.text
        r = await api.post(
            "/api/v1/set_room_moderator", json={"room_id": room_id, "moderator_user_id": MODERATOR}
        )
        assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.timeout(300 + 240 * ROUNDS)
async def test_faults_under_load(
    tmp_path: Path,
    key_paths: tuple[Path, Path],
    start_origin: Callable[[], Awaitable[Origin]],  # noqa: F811
    tls_ca_file: str,  # noqa: F811
    http_server: Any,  # noqa: F811
    fake_client_api: FakeClientAPI,  # noqa: F811
    https_target: Any,  # noqa: F811
    receiver: WebhookReceiver,  # noqa: F811
    webhook_ca_file: str,  # noqa: F811
    https_server: Any,  # noqa: F811
) -> None:
    seed = int(os.environ.get("WARDEN_FAULTS_SEED") or random.randrange(1 << 31))
    rng = random.Random(seed)
    print(f"\nfault suite: seed {seed}, {ROUNDS} round(s), {RATE:.0f} requests/s")
    setup = time.monotonic()
    servers = await PrivateServers.start(tmp_path / "servers")
    try:
        origins = [await start_origin() for _ in range(3)]
        fake_client_api.tokens["tok"] = MODERATOR
        homeserver = FaultyAnswers(fake_client_api)
        client_api = await http_server(homeserver)
        webhook = FaultyAnswers(receiver)
        target = await https_target(webhook)
        fed, pol = key_paths
        # The moderation bot's server, where the moderator sends its commands.
        federation_key = load_signing_key(fed)
        bot_server = Destination(
            "", Keyring(key_id_of(federation_key), get_verify_key(federation_key))
        )
        bot_federation = FaultyAnswers(bot_server)
        bot_server.name = (await https_server(bot_federation, host="127.0.0.1")).address
        loopback_ok = ",".join(DENIED_WITHOUT_LOOPBACK)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env.update(
            PS_DATABASE=servers.database_url,
            PS_REDIS_URL=servers.redis_url,
            PS_NATS_URL=servers.nats_url,
            PS_HOMESERVER_NAME="warden.test",
            PS_HOMESERVER_SIGNING_KEY_PATH=str(fed),
            PS_HOMESERVER_EVENT_SIGNING_KEY_PATH=str(pol),
            PS_SHUTDOWN_DELAY_SECONDS="0",
            PS_STARTUP_TIMEOUT_SECONDS="60",
            PS_API_KEY=API_KEY,
            PS_DIRECT_KEY_FETCHING="true",
            PS_KEY_QUERY_SERVER="",
            PS_FEDERATION_CA_FILE=tls_ca_file,
            PS_HOMESERVER_DENIED_NETWORKS=loopback_ok,
            PS_TRUSTED_ORIGINS=",".join(o.name for o in origins),
            PS_SIGN_RATE_LIMIT_PER_ORIGIN="0",
            PS_SEND_RATE_LIMIT_PER_ORIGIN="0",
            PS_EVALUATION_CLAIM_TTL_SECONDS=str(CLAIM_TTL),
        )
        per_service = {
            "moderator": {
                "PS_MODERATOR_ACCESS_TOKENS": f"{client_api.base_url}:tok",
                "PS_MODERATION_TIMEOUT_SECONDS": str(SERVICE_HTTP_TIMEOUT),
                "PS_MODERATION_RETRY_BASE_SECONDS": "0.5",
                "PS_FEDERATION_TIMEOUT_SECONDS": str(SERVICE_HTTP_TIMEOUT),
                "PS_MODERATION_COMMAND_BACKOFF_BASE_SECONDS": "0.2",
                "PS_MODERATION_COMMAND_BACKOFF_MAX_SECONDS": "1",
                "PS_MODERATION_COMMAND_POLL_SECONDS": "0.5",
            },
            "webhooks": {
                "PS_ALLOWED_WEBHOOK_DOMAINS": "localhost",
                "PS_WEBHOOK_CA_FILE": webhook_ca_file,
                "PS_WEBHOOK_TIMEOUT_SECONDS": str(SERVICE_HTTP_TIMEOUT),
                "PS_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            },
        }
        stack = FaultStack.start(env, per_service, tmp_path / "services.log")
        try:
            not_ready = await stack.supervisor.wait_ready(120)
            assert not not_ready, f"not ready: {not_ready}\n{stack.tail()}"
            print(f"stack ready after {time.monotonic() - setup:.0f}s")
            room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
            await configure(
                stack.api_urls["gateway-a"], room_id, target.url("/hook"),
                f"@bot:{bot_server.name}",
            )  # fmt: skip

            began = time.monotonic()
            traffic = Traffic(stack, origins, room_id, rng, rate=RATE)
            sending = asyncio.create_task(traffic.run())
            await asyncio.sleep(3)  # steady traffic before the first fault
            faults = Faults(
                stack, servers, traffic,
                {"homeserver": [homeserver, bot_federation], "webhook": [webhook]}, rng,
                claim_ttl=CLAIM_TTL,
            )  # fmt: skip
            try:
                await faults.run(fault_plan(rng, ROUNDS))
                await asyncio.sleep(3)
            finally:
                traffic.stop()
                stopping = time.monotonic()
                await sending
                print(f"traffic stopped in {time.monotonic() - stopping:.0f}s")
            duration = time.monotonic() - began
            assert not stack.supervisor.failed.is_set(), stack.supervisor.failure

            pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=2)
            assert pool is not None
            try:
                settling = time.monotonic()
                await settle(pool, timeout=90)
                print(f"traffic {duration:.0f}s, settled in {time.monotonic() - settling:.0f}s")
                figures = Figures(seed=seed, duration_seconds=duration)
                findings = await check(
                    pool, traffic, faults.done, homeserver, webhook, figures,
                    stack.supervisor.starts(), bot_server,
                )  # fmt: skip
            finally:
                await pool.close()
        finally:
            await stack.stop()
    finally:
        servers.stop()

    table = figures.table()
    print(table)
    report = os.environ.get("WARDEN_FAULTS_REPORT")
    if report:
        Path(report).write_text(table + "\n")
    problems = findings.all()
    # Each process that exited by itself: why, from its own lines (the tail below is
    # of every service and seldom reaches back to the exit).
    exited = {item.split(":")[0]: "" for item in findings.unplanned_exits}
    for name in exited:
        exited[name] = stack.exits_of(name)
    if problems:
        # pytest keeps only its last few temporary directories, and other sessions on
        # the machine rotate them: keep the services' output where it can be read.
        kept = Path(tempfile.gettempdir()) / f"warden-faults-{seed}.log"
        shutil.copyfile(stack.log_path, kept)
        print(f"services' output kept in {kept}")
    summary = "\n".join(
        f"{name} ({len(items)}):\n  " + "\n  ".join(items[:15]) for name, items in problems.items()
    )
    for name in exited:
        summary += f"\n\n{name}'s errors and exits:\n{exited[name]}"
    assert not problems, f"{summary}\n\n{table}\n\nservices' output (end):\n{stack.tail(25)}"
    assert figures.faults["kill"] == 6 * ROUNDS
    assert figures.requests["sign"] > 0 and figures.requests["send"] > 0
    assert figures.prohibited_checked > 0
