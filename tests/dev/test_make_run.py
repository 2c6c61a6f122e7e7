"""`make run` for real: the actual CLI and services, every server embedded as on a fresh
machine, and a correctly self-signed key document from the gateway."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import httpx
from signedjson.key import get_verify_key, read_signing_keys
from signedjson.sign import verify_signed_json
from unpaddedbase64 import encode_base64

# The autouse fixture stops a stack that a failing assertion left running.
from tests.dev.test_dev_stack import Stack, _no_stack_left_behind  # noqa: F401
from tests.gateway.policy_harness import synapse_verifies
from tests.service_processes import free_port
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.keys import POLICY_SERVER_KEY_ID, key_id_of, verify_key_base64
from warden.matrix.room_versions import get_room_version

REPO = Path(__file__).resolve().parents[2]


def test_make_run_brings_up_the_whole_stack_and_serves_a_self_signed_key(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PS_", "MAKE"))}
    binds = {
        "PS_HTTP_BIND": f"127.0.0.1:{free_port()}",
        "PS_HTTP_METRICS_BIND": f"127.0.0.1:{free_port()}",
        "PS_DEV_FILTER_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}",
        "PS_DEV_MODERATOR_METRICS_BIND": f"127.0.0.1:{free_port()}",
        "PS_DEV_WEBHOOKS_METRICS_BIND": f"127.0.0.1:{free_port()}",
    }
    env.update(binds)
    env.update(
        PS_DEV_DIR=str(tmp_path / "state"),
        PS_HOMESERVER_NAME="warden.localtest",
        # Nothing answers at these: make run must embed NATS and Redis; PS_DATABASE is
        # left at policyserv's default, which cannot log in here, so PostgreSQL too.
        PS_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        PS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    stack = Stack(env, argv=["make", "--no-print-directory", "run"], cwd=REPO)
    stack.wait_for("press Ctrl-C to stop", timeout=240)
    output = stack.output()
    assert "embedded" in output.lower()

    for name in (
        "PS_HTTP_METRICS_BIND",
        "PS_DEV_FILTER_WORKER_METRICS_BIND",
        "PS_DEV_MODERATOR_METRICS_BIND",
        "PS_DEV_WEBHOOKS_METRICS_BIND",
    ):
        ready = httpx.get(f"http://{binds[name]}/readyz", timeout=5)
        assert ready.status_code == 200, (name, ready.text)

    doc = httpx.get(f"http://{binds['PS_HTTP_BIND']}/_matrix/key/v2/server", timeout=5).json()
    keys_dir = tmp_path / "state" / "keys"
    fed = read_signing_keys((keys_dir / "signing.key").open())[0]
    pol = read_signing_keys((keys_dir / "event_signing.key").open())[0]
    assert doc["server_name"] == "warden.localtest"
    assert set(doc["verify_keys"]) == {key_id_of(fed)}
    assert POLICY_SERVER_KEY_ID not in doc["verify_keys"]
    assert doc["verify_keys"][key_id_of(fed)]["key"] == verify_key_base64(fed)
    assert verify_key_base64(pol) not in str(doc)
    verify_signed_json(doc, "warden.localtest", get_verify_key(fed))

    # The README's "Try it": protect a room with the dev admin key, then play a
    # homeserver with `warden sign-request`.
    api_key = (tmp_path / "state" / "api_key").read_text().strip()
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    gateway = f"http://{binds['PS_HTTP_BIND']}"
    r = httpx.put(
        f"{gateway}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
        json={"room_version": "12", "community_id": "default"},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    sign_url = f"{gateway}/_matrix/policy/v1/sign"

    def sign_request(text: str, saved: Path) -> tuple[int, dict[str, object]]:
        done = subprocess.run(
            [
                str(REPO / ".venv" / "bin" / "warden"),
                "sign-request",
                "--url",
                sign_url,
                "--build-event",
                "--room",
                room_id,
                "--body-text",
                text,
                "--save-event",
                str(saved),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        head, _, body = done.stdout.partition("\n")
        assert head.startswith("HTTP "), (done.stdout, done.stderr)
        return int(head.removeprefix("HTTP ")), json.loads(body)

    status, answer = sign_request("hello, world", tmp_path / "neutral.json")
    assert status == 200, answer
    event = json.loads((tmp_path / "neutral.json").read_text())
    signature = answer["warden.localtest"]["ed25519:policy_server"]  # type: ignore[index]
    assert synapse_verifies("12", event, "warden.localtest", signature, pol)

    status, answer = sign_request("this is spam", tmp_path / "spam.json")
    assert status == 400, answer
    assert answer["errcode"] == "M_FORBIDDEN"
    assert "org.matrix.msc4456.spam" in answer["org.matrix.msc4387.harms"]  # type: ignore[operator]
    spam_id = compute_event_id(
        get_room_version("12"), json.loads((tmp_path / "spam.json").read_text())
    )

    def logged_by(service: str) -> list[dict[str, object]]:
        records = []
        for line in stack.output().splitlines():
            name, sep, payload = line.partition(" | ")
            if sep and name.strip() == service and payload.startswith("{"):
                record = json.loads(payload)
                if spam_id in json.dumps(record):
                    records.append(record)
        return records

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (logged_by("moderator") and logged_by("webhooks")):
        time.sleep(0.2)
    assert logged_by("moderator"), "the moderator logged nothing about the refused event"
    assert logged_by("webhooks"), "the webhooks service logged nothing about it"

    # Ctrl-C in a terminal signals the whole foreground process group (make and
    # warden dev). warden dev stops everything and exits 0; make then reports the
    # interrupt itself (it re-raises SIGINT), which is what a user sees too.
    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.finish(None) in (0, -signal.SIGINT, 128 + signal.SIGINT, 2)
    output = stack.output()
    assert "Traceback" not in output
    stopped = set()
    for line in output.splitlines():
        _, sep, payload = line.partition(" | ")
        if sep and payload.startswith("{"):
            record = json.loads(payload)  # services log one JSON object per line
            if record.get("event") == "stopped":
                stopped.add(record["service"])
    assert stopped == {"gateway", "filter-worker", "moderator", "webhooks"}
    for bind in binds.values():
        host, port = bind.rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{bind} still listening"
