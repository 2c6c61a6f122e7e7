"""The benchmark harness: its crypto floor does the real work, and a tiny run of the
whole harness (``BENCH_QUICK=1``) ends with a well-formed results file.

Nothing here looks at how fast anything was: only that every window ran and was
measured and reported.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
from signedjson.key import generate_signing_key, get_verify_key

from bench import events
from bench.events import GATEWAY_NAME, SIGN_PATH, EventFactory, Origin, RequestFile
from bench.floors import CryptoFloor
from tests.conftest import NATS_URL, PG_ADMIN
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.event_signing import verify_event_signature
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version

ROOT = Path(__file__).resolve().parents[2]


def _split(raw: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    return headers, body


async def test_crypto_floor_signs_what_the_request_file_holds(tmp_path: Path) -> None:
    origins = [Origin(f"127.0.0.1:{9000 + i}", generate_signing_key(f"k{i}")) for i in range(3)]
    rng = random.Random(1)
    rooms = events.make_rooms(5, rng)
    factory = EventFactory(rooms, rng)
    requests = RequestFile()
    events.unique_requests(factory, origins, 12, requests)
    events.mixed_requests(factory, origins, 12, requests, follow_up_gap=2)
    path = tmp_path / "requests.bin"
    requests.write(path)

    policy_key = generate_signing_key("policy_server")
    app = CryptoFloor(
        GATEWAY_NAME,
        policy_key,
        events.origin_key_table(origins),
        {r.room_id: r.room_version for r in rooms},
    )
    versions = {r.room_id: r.room_version for r in rooms}
    raw_requests = events.read_request_file(path)
    assert len(raw_requests) == 24
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
        for raw in raw_requests:
            headers, body = _split(raw)
            assert int(headers["content-length"]) == len(body)
            pdu = orjson.loads(body)
            # Bodies are canonical JSON, as Synapse sends them.
            assert body == encode_canonical_json(pdu)
            assert 400 <= len(body) <= events.MAX_PDU_BYTES + 200
            r = await client.post(SIGN_PATH, content=body, headers=headers)
            assert r.status_code == 200, r.text
            signature = r.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
            signed = {**pdu, "signatures": {GATEWAY_NAME: {POLICY_SERVER_KEY_ID: signature}}}
            version = get_room_version(versions[pdu["room_id"]])
            assert verify_event_signature(
                version, signed, GATEWAY_NAME, POLICY_SERVER_KEY_ID, get_verify_key(policy_key)
            )

        # A body changed after signing fails X-Matrix: the floor really verifies.
        headers, body = _split(raw_requests[0])
        tampered = body.replace(b'"depth":', b'"depth":1', 1)
        headers["content-length"] = str(len(tampered))
        r = await client.post(SIGN_PATH, content=tampered, headers=headers)
        assert r.status_code == 401
        assert r.json()["errcode"] == "M_UNAUTHORIZED"
    assert requests.kinds["neutral"] >= 12


def _check_window(name: str, window: dict[str, Any], processes: set[str]) -> None:
    assert window["requests"] > 0, name
    assert window["rps"] > 0, name
    assert set(window["latency_ms"]) >= {"50", "95", "99", "mean", "max"}, name
    assert window["latency_ms"]["50"] <= window["latency_ms"]["99"], name
    assert sum(window["statuses"].values()) > 0, name
    assert set(window["socket_errors"]) >= {"connect", "read", "write", "timeout"}, name
    assert processes <= set(window["cpu_ms_per_request"]), (name, window["cpu_ms_per_request"])
    assert "loadgen" in window["cpu_ms_per_request"], name


def test_quick_run_writes_results_with_every_workload(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {
        **os.environ,
        "BENCH_QUICK": "1",
        "BENCH_RESULTS_DIR": str(results),
        "BENCH_PG_ADMIN": PG_ADMIN,
        "BENCH_NATS_URL": NATS_URL,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    files = list(results.glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())

    assert doc["machine"]["nproc"] >= 1
    assert doc["machine"]["python"]
    assert doc["settings"]["quick"] is True
    assert set(doc["floors"]) == {"http_floor", "crypto_floor"}
    assert set(doc["workloads"]) == {"unique", "unique_paced", "spam_wave", "mixed"}
    for name, window in doc["floors"].items():
        _check_window(name, window, {f"{name.split('_')[0]}-floor-0"})
        assert set(window["statuses"]) == {"200"}, (name, window["statuses"])
    assert doc["floors"]["crypto_floor"]["ratio_to_crypto_floor"] == 1.0
    for name, window in doc["workloads"].items():
        _check_window(name, window, {"gateway-0", "filter-worker-0", "redis", "nats"})
        assert window["ratio_to_crypto_floor"] > 0, name
    # Neutral events are signed; nothing answered 5xx.
    for name in ("unique", "unique_paced", "spam_wave"):
        assert set(doc["workloads"][name]["statuses"]) == {"200"}, doc["workloads"][name]
    assert not any(s.startswith("5") for s in doc["workloads"]["mixed"]["statuses"])
    assert doc["workloads"]["unique"]["wraps"] == 0
    assert doc["workloads"]["mixed"]["mix_in_file"]["keyword"] > 0

    scaling = doc["scaling"]
    assert set(scaling["unique"]) == {
        "gateways=1,workers=1",
        "gateways=2,workers=1",
        "gateways=1,workers=2",
        "gateways=2,workers=2",
    }
    for key, window in scaling["unique"].items():
        assert window["ratio_to_crypto_floor_same_processes"] > 0, key
    two = scaling["unique"]["gateways=2,workers=2"]
    _check_window("2x2", two, {"gateway-0", "gateway-1", "filter-worker-0", "filter-worker-1"})
    _check_window("floor x2", scaling["crypto_floor_x2"], {"crypto-floor-0", "crypto-floor-1"})
    assert doc["targets"][0]["target"] == "unique req/s"
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
    # The markdown table is printed with a row per window.
    for row in ("| http_floor |", "| crypto_floor |", "| unique |", "| spam_wave |", "| mixed |"):
        assert row in done.stdout
