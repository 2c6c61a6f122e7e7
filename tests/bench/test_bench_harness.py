"""The benchmark harness: its crypto floor does the real work, and a tiny run of the
whole harness (``BENCH_QUICK=1``) ends with a well-formed results file.

Nothing here looks at how fast anything was: only that every window ran and was
measured and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from signedjson.key import generate_signing_key, get_verify_key

from bench import attack, events, harness, image_load
from bench.events import GATEWAY_NAME, SIGN_PATH, EventFactory, Origin, RequestFile
from bench.floors import CryptoFloor
from tests.conftest import NATS_URL, PG_ADMIN
from warden.federation.xmatrix import MalformedAuthorization, parse_authorization_headers
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
    # What the hypervisor took from the machine during the window: a share, for noise.
    assert 0.0 <= window["machine_cpu_steal"] <= window["machine_cpu_busy"] <= 1.0, name


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
    assert set(doc["workloads"]) == {
        "unique",
        "unique_paced",
        "unique_paced_high",
        "spam_wave",
        "spam_wave_paced",
        "mixed",
        "images_hma",
        "text_fast_classifier",
        "text_slow_classifier",
        "antispam_paced",
        "attack_quiet",
        "under_attack",
    }
    for name, window in doc["floors"].items():
        _check_window(name, window, {f"{name.split('_')[0]}-floor-0"})
        assert set(window["statuses"]) == {"200"}, (name, window["statuses"])
    assert doc["floors"]["crypto_floor"]["ratio_to_crypto_floor"] == 1.0
    for name, window in doc["workloads"].items():
        _check_window(name, window, {"gateway-0", "filter-worker-0", "redis", "nats"})
        assert window["ratio_to_crypto_floor"] > 0, name
    # Neutral events are signed; nothing answered 5xx.
    for name in ("unique", "unique_paced", "unique_paced_high", "spam_wave", "spam_wave_paced"):
        assert set(doc["workloads"][name]["statuses"]) == {"200"}, doc["workloads"][name]
    # The paced spam wave asks for each of its fresh events from several origins.
    paced_spam = doc["workloads"]["spam_wave_paced"]
    assert paced_spam["target_rps"] == doc["settings"]["spam_paced_rps"]
    assert paced_spam["requests_in_file"] > 2 * paced_spam["distinct_events"]
    issue_17 = {t["target"]: t for t in doc["targets"] if "issue 17" in t["goal"]}
    memory_rows = {name for name in issue_17 if name.endswith("resident memory (MiB)")}
    assert memory_rows == {
        "under attack: gateway resident memory (MiB)",
        "under attack: filter-worker resident memory (MiB)",
    }
    assert all(issue_17[name]["met"] for name in memory_rows), issue_17  # tiny windows
    assert len(issue_17) == 5 + len(memory_rows), issue_17
    assert not any(s.startswith("5") for s in doc["workloads"]["mixed"]["statuses"])
    assert doc["workloads"]["unique"]["wraps"] == 0
    assert doc["workloads"]["mixed"]["mix_in_file"]["keyword"] > 0
    # Images with HMA on: each distinct media downloaded and hashed once, the bank's
    # matches refused, nothing answered 5xx.
    images = doc["workloads"]["images_hma"]
    assert not any(s.startswith("5") for s in images["statuses"]), images["statuses"]
    assert images["statuses"].get("400", 0) > 0
    assert images["statuses"].get("200", 0) > 0  # not every image refused by another filter
    # A scan whose download ended as the window did may not have reached HMA yet (seen
    # on a loaded machine): hashes can trail downloads, never exceed them.
    assert 0 < images["hma"]["hma_hashes"] <= images["hma"]["downloads"]
    assert images["hma"]["downloads"] <= images["distinct_events"]
    # Text beside image scans (issue 12), HMA answering at once, then after a delay:
    # every text request is still answered and signed, the images really waited on HMA
    # in the slow window, and the slow window's ratio to the fast one is reported
    # (whatever it is) with its target row.
    fast = doc["workloads"]["text_fast_classifier"]
    slow = doc["workloads"]["text_slow_classifier"]
    for window in (fast, slow):
        assert set(window["statuses"]) == {"200"}, window["statuses"]
        assert window["socket_errors"]["timeout"] == 0, window["socket_errors"]
        classifier = window["slow_classifier"]
        assert classifier["image_requests"] > 0, classifier
        assert set(classifier["image_statuses"]) == {"200"}, classifier
        assert classifier["hma"]["hma_hashes"] >= classifier["image_requests"], classifier
        assert classifier["image_period_s"] == harness.IMAGE_PERIOD_SECONDS
        ratio = window["text_rps_ratio_to_unique"]
        # From the unrounded rates; the document's rates are rounded to 0.1 req/s.
        assert ratio == pytest.approx(window["rps"] / doc["workloads"]["unique"]["rps"], abs=5e-3)
    assert fast["slow_classifier"]["hma_delay_s"] == 0
    classifier = slow["slow_classifier"]
    assert classifier["hma_delay_s"] >= 1
    assert classifier["hma_hashing_at_start"] >= 1, classifier  # busy as the window began
    assert classifier["image_latency_ms"]["50"] >= 1000 * classifier["hma_delay_s"], classifier
    ratio = slow["text_rps_ratio_to_fast_classifier"]
    assert ratio == pytest.approx(slow["rps"] / fast["rps"], abs=5e-3)
    assert ratio > 0
    slow_rows = [t for t in doc["targets"] if t["target"].startswith("text req/s while images")]
    assert [t["measured"] for t in slow_rows] == [ratio]
    # check_event_for_spam: local events allowed (200), keyword ones refused (403).
    antispam = doc["workloads"]["antispam_paced"]
    assert set(antispam["statuses"]) == {"200", "403"}, antispam["statuses"]
    assert [t for t in doc["targets"] if t["target"].startswith("antispam check_event")]

    # The attack window (issue 10): measured and reported, whatever the figures are.
    assert doc["settings"]["attack"] is True
    assert set(doc["workloads"]["attack_quiet"]["statuses"]) == {"200"}
    assert "attacker" in doc["workloads"]["under_attack"]["cpu_ms_per_request"]
    report = doc["attack"]
    assert set(report["traffic"]) == {"junk", "made_up_origins", "oversized"}
    for name, traffic in report["traffic"].items():
        assert traffic["requests"] > 0, (name, traffic)
    assert report["traffic"]["oversized"]["bytes_sent"] > 0
    assert report["attacker_source"] == "127.0.0.2"
    assert set(report["ratios"]) >= {"success_ratio", "p99_ratio", "rps_ratio", "goal"}
    assert report["ratios"]["success_rate_quiet"] == 1.0
    for when in ("after_quiet", "after_attack"):
        memory = report["memory_mib"][when]
        assert {"gateway-0", "filter-worker-0", "redis", "nats"} <= set(memory), memory
        assert all(v > 0 for v in memory.values()), memory
    # Every workload window reports each service's resident memory after it (issue 17).
    for name, window in doc["workloads"].items():
        memory = window["memory_mib_after"]
        assert {"gateway-0", "filter-worker-0", "redis", "nats"} <= set(memory), (name, memory)
        assert all(v > 0 for v in memory.values()), (name, memory)
    assert "Resident memory after each window (MiB):" in done.stdout
    attack_targets = [t for t in doc["targets"] if t["target"].startswith("under attack")]
    assert len(attack_targets) == 2 + len(memory_rows)
    assert "Under attack: legitimate origin" in done.stdout

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
    for row in (
        "| http_floor |",
        "| crypto_floor |",
        "| unique |",
        "| spam_wave |",
        "| mixed |",
        "| text_slow_classifier |",
        "| antispam_paced |",
        "| attack_quiet |",
        "| under_attack |",
    ):
        assert row in done.stdout


# --- the attack window (issue 10): its traffic, its ratios, its report ---


def _parse_raw(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """Method, path, headers (in order, names lower-cased) and body of a raw request,
    checking the framing: the body is exactly Content-Length bytes."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no end of head"
    request_line, *lines = head.decode().split("\r\n")
    method, path, version = request_line.split(" ")
    assert version == "HTTP/1.1"
    headers = [(k.lower(), v) for k, _, v in (line.partition(": ") for line in lines)]
    lengths = [v for k, v in headers if k == "content-length"]
    assert lengths == [str(len(body))]
    return method, path, headers, body


_SERVER_NAME_IN_TEXT = re.compile(
    rb'origin=\\?"([^"\\\r\n]+)\\?"|"origin":"([^"]+)"|"sender":"@[^:"]+:([^"]+)"'
)


def _server_names(raw: bytes) -> set[str]:
    """Every server name a request mentions: X-Matrix and transaction origins, senders."""
    return {next(g for g in m if g).decode() for m in _SERVER_NAME_IN_TEXT.findall(raw)}


def _assert_loopback_names(names: set[str], ports: list[int]) -> None:
    """IP literals (no DNS, no well-known) in 127/8 but not 127.0.0.x, where the bench's
    own servers listen, each on a port the attacker holds."""
    for name in names:
        host, _, port = name.rpartition(":")
        assert ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8"), name
        assert not host.startswith("127.0.0."), name
        assert int(port) in ports, name


def test_antispam_requests_are_what_synapse_http_antispam_sends(tmp_path: Path) -> None:
    rng = random.Random(5)
    factory = EventFactory(events.make_rooms(2, rng), rng)
    origin = Origin("127.0.0.1:8448", generate_signing_key("a"))
    out = RequestFile()
    events.antispam_requests(factory, origin, 20, out, "pst_token")
    assert out.kinds == {"keyword": 2, "neutral": 18}
    out.write(tmp_path / "requests.bin")
    spammers: list[str] = []
    for raw in events.read_request_file(tmp_path / "requests.bin"):
        method, path, headers, body = _parse_raw(raw)
        assert (method, path) == ("POST", events.ANTISPAM_PATH)
        assert ("authorization", "Bearer pst_token") in headers
        event = orjson.loads(body)["event"]
        assert event["event_id"].startswith("$") and event["type"] == "m.room.message"
        assert not {"hashes", "signatures", "auth_events", "prev_events"} & set(event)
        if events.PROHIBITED_KEYWORD in event["content"]["body"]:
            spammers.append(event["sender"])
    # Each refused event comes from a new spammer, never one of the origin's ordinary
    # users, whom the hellban would otherwise refuse in later windows (the attack's
    # legitimate origin is this one).
    assert len(spammers) == len(set(spammers)) == 2
    assert all(s.startswith("@antispammer") for s in spammers), spammers


def test_junk_requests_carry_no_usable_authentication() -> None:
    requests = attack.junk_requests(random.Random(1), 70, GATEWAY_NAME, [12345])
    assert len(requests) == 70
    kinds = {kind for kind, _ in requests}
    assert len(kinds) == 7  # every shape, in turn
    for kind, raw in requests:
        method, path, headers, body = _parse_raw(raw)
        if kind.startswith("sign"):
            assert (method, path) == ("POST", SIGN_PATH)
        else:
            assert method == "PUT"
            assert path.startswith(attack.SEND_PREFIX)
            assert len(path) > len(attack.SEND_PREFIX)
        auth = [v for k, v in headers if k == "authorization"]
        if "no_auth" in kind:
            assert auth == []
        elif "many_xmatrix" in kind:
            assert len(auth) == 50
        # Never an X-Matrix credential Warden could act on: none, or malformed.
        with contextlib.suppress(MalformedAuthorization):
            assert parse_authorization_headers(auth) == [], kind
        # The body is never a JSON object that would pass as a PDU or transaction.
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if "many_xmatrix" not in kind:
            assert not isinstance(parsed, dict), kind
        _assert_loopback_names(_server_names(raw), [12345])


def test_made_up_origins_are_distinct_loopback_names_on_reserved_ports() -> None:
    held = attack.reserve_ports(2)
    try:
        ports = [int(s.getsockname()[1]) for s in held]
        requests = attack.made_up_origin_requests(random.Random(2), 200, GATEWAY_NAME, ports)
        origins = []
        for kind, raw in requests:
            method, path, headers, body = _parse_raw(raw)
            auth = [v for k, v in headers if k == "authorization"]
            assert len(auth) == 1
            (cred,) = parse_authorization_headers(auth)  # well-formed X-Matrix
            assert cred.destination == GATEWAY_NAME
            names = _server_names(raw)
            assert cred.origin in names
            _assert_loopback_names(names, ports)
            origins.append(cred.origin)
            doc = orjson.loads(body)
            if kind == "sign":
                assert (method, path) == ("POST", SIGN_PATH)
                assert {"room_id", "sender", "type", "content", "signatures"} <= set(doc)
            else:
                assert method == "PUT"
                assert path.startswith(attack.SEND_PREFIX)
                assert doc["origin"] == cred.origin
                assert isinstance(doc["pdus"], list)
                assert len(doc["pdus"]) == 1
        assert len(set(origins)) == len(origins)
        assert {kind for kind, _ in requests} == {"sign", "send"}

        # A key fetch for such a name is refused at once, on loopback.
        host, _, port = origins[0].rpartition(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5)
    finally:
        for sock in held:
            sock.close()


def test_oversized_send_requests_announce_their_size() -> None:
    size = 3 * 1024 * 1024
    heads = attack.oversized_heads(random.Random(3), 4, GATEWAY_NAME, size, [12345])
    body = attack.oversized_body(size, "127.9.9.9:12345")
    assert len(body) == size
    assert isinstance(orjson.loads(body)["pdus"], list)
    assert _server_names(body[:200]) == {"127.9.9.9:12345"}
    assert [kind for kind, _ in heads] == ["no_auth", "made_up_origin"] * 2
    for kind, head in heads:
        method, path, headers, rest = _parse_raw(head + body)
        assert rest == body
        assert method == "PUT"
        assert path.startswith(attack.SEND_PREFIX)
        auth = [v for k, v in headers if k == "authorization"]
        assert len(auth) == (0 if kind == "no_auth" else 1)
        _assert_loopback_names(_server_names(head), [12345])


async def _toy_gateway(
    seen: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A real local HTTP server standing in for the gateway: refuses everything; a big
    body is refused before it is read, and the connection closed."""
    seen["peers"].add(writer.get_extra_info("peername")[0])
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length > 1024 * 1024:
                seen["big"] += 1
                writer.write(
                    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\n{}"
                )
                await writer.drain()
                return
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _toy_plan(
    port: int, *, duration: float, connections: int, oversized_connections: int, mib: int
) -> attack.AttackPlan:
    """A small attack on ``_toy_gateway`` at ``port``."""
    return attack.AttackPlan(
        target=f"127.0.0.1:{port}",
        destination=GATEWAY_NAME,
        duration=duration,
        max_requests=60,
        max_oversized=4,
        connections=connections,
        oversized_connections=oversized_connections,
        oversized_bytes=mib * 1024 * 1024,
        distinct_made_up=40,
    )


async def test_attacker_floods_each_class_within_its_bounds() -> None:
    seen: dict[str, Any] = {"peers": set(), "big": 0}
    server = await asyncio.start_server(lambda r, w: _toy_gateway(seen, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    plan = _toy_plan(port, duration=30, connections=3, oversized_connections=2, mib=2)
    assert attack.AttackPlan.from_json(plan.to_json()) == plan
    async with server:
        held = attack.reserve_ports(1)
        try:
            stats = await attack.Attacker(plan, [held[0].getsockname()[1]]).run()
        finally:
            held[0].close()
    assert set(stats) == set(attack.CLASSES)
    # Bounded by count (well before the 30 s): exactly the caps, every one answered.
    for name in ("junk", "made_up_origins"):
        assert stats[name]["requests"] == 60, stats[name]
        assert stats[name]["statuses"] == {"401": 60}, stats[name]
        assert sum(stats[name]["kinds"].values()) == 60
    big = stats["oversized"]
    assert big["requests"] == 4
    assert big["statuses"] == {"413": 4}
    assert big["connections_opened"] == 4  # a new connection for each
    assert big["bytes_sent"] <= 4 * plan.oversized_bytes
    assert seen["big"] == 4
    # Connections come from the attacker's own loopback address.
    assert seen["peers"] == {"127.0.0.2"}


def _window(statuses: dict[str, int], p99: float, rps: float, **errors: int) -> dict[str, Any]:
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, **errors}
    return {
        "statuses": statuses,
        "socket_errors": socket_errors,
        "latency_ms": {"50": p99 / 2, "99": p99},
        "rps": rps,
        "requests": sum(statuses.values()),
    }


def test_attack_ratios_compare_with_the_quiet_window() -> None:
    quiet = _window({"200": 1000}, 20.0, 200.0)
    hurt = _window({"200": 900, "503": 50}, 90.0, 150.0, timeout=50)
    r = harness.attack_ratios(quiet, hurt)
    assert r["success_rate_quiet"] == 1.0
    assert r["success_rate_under_attack"] == 0.9  # 900 of 1000 (timeouts count)
    assert r["success_ratio"] == 0.9
    assert r["p99_ratio"] == 4.5
    assert r["rps_ratio"] == 0.75
    assert r["goal"] == {"all_answered": False, "p99_within_2x": False}

    fine = harness.attack_ratios(quiet, _window({"200": 990}, 30.0, 198.0))
    assert fine["goal"] == {"all_answered": True, "p99_within_2x": True}
    assert fine["p99_ratio"] == 1.5

    # Nothing measured: no division by zero, the goal not met.
    empty = harness.attack_ratios(_window({}, 0.0, 0.0), _window({}, 0.0, 0.0))
    assert empty["p99_ratio"] is None
    assert empty["success_ratio"] is None
    assert empty["goal"] == {"all_answered": False, "p99_within_2x": False}


def test_attack_report_in_targets_and_table() -> None:
    ratios = harness.attack_ratios(
        _window({"200": 100}, 10.0, 50.0), _window({"200": 80, "503": 20}, 35.0, 40.0)
    )
    traffic = {
        name: attack.ClassStats(requests=10, duration_s=2.0).to_json() for name in attack.CLASSES
    }
    report = {
        "legit_origin": "127.0.0.1:1111",
        "legit_target_rps": 50,
        "attacker_source": "127.0.0.2",
        "attacker_target": "127.0.0.1:2222",
        "ratios": ratios,
        "traffic": traffic,
        "attacker_cpu_s": 0.4,
        "memory_mib": {
            "after_quiet": {"gateway-0": 80.0, "redis": 6.0},
            "after_attack": {"gateway-0": 400.5, "redis": 9.0},
        },
        "died": [],
    }
    table = "\n".join(harness.attack_markdown(report))
    assert "| answered 200 | 100.00 % | 80.00 % | 0.80 |" in table
    assert "| p99 ms | 10.0 | 35.0 | 3.50 |" in table
    assert "| gateway-0 | 80.0 | 400.5 |" in table
    for name in attack.CLASSES:
        assert f"| {name} | 10 | 5 |" in table

    unique = {"rps": 1, "ratio_to_crypto_floor": 1, "latency_ms": {"99": 1}}
    results = {"unique": unique, "unique_paced": unique, "spam_wave": unique}
    config = harness.BenchConfig.from_env()
    rows = {t["target"]: t for t in harness.targets(results, config, report)}
    answered = rows["under attack: legitimate /sign answered 200 (%)"]
    assert (answered["measured"], answered["met"]) == (80.0, False)
    assert rows["under attack: p99 / quiet p99"]["measured"] == 3.5
    memory = rows["under attack: gateway resident memory (MiB)"]
    assert (memory["measured"], memory["met"]) == (400.5, True)  # the manifest says 512Mi
    assert memory["goal"].startswith("< 512 (deploy/k8s memory limit")
    assert len(harness.targets(results, config)) == len(rows) - 3


def test_memory_after_the_attack_is_held_to_the_manifests_limits(tmp_path: Path) -> None:
    """Each service's largest replica against the memory limit its Deployment sets;
    processes without a manifest (the servers) have no row."""
    (tmp_path / "gateway.yaml").write_text(
        """
apiVersion: v1
kind: Service
metadata: {name: warden-gateway}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: warden-gateway}
spec:
  template:
    spec:
      containers:
        - name: gateway
          resources: {limits: {memory: 1Gi}}
        - name: sidecar
"""
    )
    (tmp_path / "worker.yaml").write_text(
        """
kind: Deployment
spec:
  template:
    spec:
      containers:
        - {name: filter-worker, resources: {limits: {memory: "300M"}}}
"""
    )
    limits = harness.k8s_memory_limits(tmp_path)
    assert limits == {"gateway": 1024.0, "filter-worker": pytest.approx(286.1, abs=0.1)}
    after = {"gateway-0": 200.0, "gateway-1": 1100.0, "filter-worker-0": 250.0, "redis": 9e9}
    rows = {name: (mib, met) for name, mib, _, met in harness.memory_limit_rows(after, limits)}
    assert rows == {
        "under attack: filter-worker resident memory (MiB)": (250.0, True),
        "under attack: gateway resident memory (MiB)": (1100.0, False),  # the larger replica
    }
    # The repository's own manifests set a limit for every Warden service.
    assert set(harness.k8s_memory_limits()) >= {"gateway", "filter-worker"}


def test_bench_attack_0_switches_the_window_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_ATTACK", raising=False)
    assert harness.BenchConfig.from_env().attack is True
    monkeypatch.setenv("BENCH_ATTACK", "0")
    config = harness.BenchConfig.from_env()
    assert config.attack is False
    assert config.settings_json()["attack"] is False


def test_issue_17_rows_read_each_window_against_its_goal() -> None:
    def window(ratio: float, rps: float, p99: float) -> dict[str, Any]:
        return {"ratio_to_crypto_floor": ratio, "rps": rps, "latency_ms": {"99": p99}}

    config = dataclasses.replace(
        harness.BenchConfig.from_env(), paced_high_rps=1000, spam_paced_rps=3000
    )
    results = {
        "unique": window(0.5, 1500, 90),
        "spam_wave": window(1.99, 5000, 30),
        "mixed": window(0.49, 1400, 90),
        "unique_paced_high": window(0.4, 995, 49.9),
        "spam_wave_paced": window(1.0, 2600, 10),  # fast, but short of its rate
    }
    rows = {t["target"]: t for t in harness.targets(results, config) if "issue 17" in t["goal"]}
    met = {name: row["met"] for name, row in rows.items()}
    assert met == {
        "unique / crypto floor (issue 17)": True,
        "spam wave / crypto floor (issue 17)": False,
        "mixed / crypto floor (issue 17)": False,
        "unique p99 at 1000 req/s (ms)": True,
        "spam wave p99 at 3000 req/s (ms)": False,
    }
    assert rows["spam wave p99 at 3000 req/s (ms)"]["goal"].endswith("achieved 2600 req/s)")
    # A window left out (BENCH_WINDOWS) has no row.
    del results["spam_wave_paced"]
    assert len([t for t in harness.targets(results, config) if "issue 17" in t["goal"]]) == 4


def test_slow_classifier_target_row_reads_the_ratio_to_the_fast_classifier() -> None:
    unique = {"rps": 1, "ratio_to_crypto_floor": 1, "latency_ms": {"99": 1}}
    results: dict[str, Any] = {"unique": unique, "unique_paced": unique, "spam_wave": unique}
    config = harness.BenchConfig.from_env()
    assert not [t for t in harness.targets(results, config) if "slow" in t["target"]]
    name = "text req/s while images wait 1.5 s on HMA / while HMA answers at once"
    for ratio, met in ((0.95, True), (0.6, False), (None, False)):
        results["text_slow_classifier"] = {
            "text_rps_ratio_to_fast_classifier": ratio,
            "text_rps_ratio_to_unique": 0.5,  # not the target
        }
        rows = {t["target"]: t for t in harness.targets(results, config)}
        assert (rows[name]["measured"], rows[name]["met"]) == (ratio or 0.0, met)


async def _answer_images(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: dict[str, Any], pause: float
) -> None:
    """A stand-in gateway for the image senders: each request answered 200 after
    ``pause``; the bodies and the most requests in flight at once noted in ``seen``."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            seen["bodies"].append(await reader.readexactly(length))
            seen["in_flight"] += 1
            seen["most"] = max(seen["most"], seen["in_flight"])
            await asyncio.sleep(pause)
            seen["in_flight"] -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_image_load_keeps_its_senders_busy_and_reports_the_window() -> None:
    """The slow-classifier window's image senders against a real local server that
    answers after a pause: each sender has one request in flight, stop waits for them."""
    seen: dict[str, Any] = {"in_flight": 0, "most": 0, "bodies": []}
    server = await asyncio.start_server(
        lambda r, w: _answer_images(r, w, seen, pause=0.2), "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    requests = [image_load.SignedRequest(f'{{"n":{i}}}'.encode(), "X-Matrix x") for i in range(40)]
    async with server:
        load = image_load.ImageLoad([url], requests, concurrency=3)
        load.start()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await asyncio.sleep(0.5)
        end = time.monotonic()
        await load.stop(grace_seconds=5)
    assert seen["most"] == 3  # one request in flight per sender, no more
    report = load.report(start, end)
    assert report["image_senders"] == 3
    # At most four rounds of 0.2 s fit before the senders were stopped (0.6 s).
    assert 3 <= report["image_requests"] <= 12, report
    assert report["image_statuses"] == {"200": report["image_requests"]}
    assert 1 <= report["image_requests_during_window"] < report["image_requests"]
    assert report["image_latency_ms"]["50"] >= 200
    # Stopping waited for the requests in flight: every body sent was answered.
    assert len(seen["bodies"]) == report["image_requests"]
    assert seen["bodies"][0] == b'{"n":0}'


async def test_image_senders_with_a_period_start_at_most_one_request_each_per_period() -> None:
    """With HMA answering at once, paced senders put as many images on the machine as
    with a slow HMA: no more than one per sender per period."""

    seen: dict[str, Any] = {"in_flight": 0, "most": 0, "bodies": []}
    server = await asyncio.start_server(
        lambda r, w: _answer_images(r, w, seen, pause=0.0), "127.0.0.1", 0
    )
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    requests = [image_load.SignedRequest(b"{}", "X-Matrix x") for _ in range(500)]
    async with server:
        load = image_load.ImageLoad([url], requests, concurrency=2, period_seconds=0.4)
        load.start()
        await asyncio.sleep(1.0)
        await load.stop(grace_seconds=5)  # not waiting out a sender's period
    # Three periods began within the second (at 0, 0.4 and 0.8 s) for each sender;
    # unpaced, they would have sent hundreds.
    assert 2 <= len(load.answers) <= 6, len(load.answers)
    assert load.report(0, 0)["image_period_s"] == 0.4


def test_image_requests_start_with_a_refused_one() -> None:
    """A short images window (a few dozen requests on a busy machine) still has an image
    in the bank to refuse: the first request is always one."""
    rng = random.Random(9)
    factory = EventFactory(events.make_rooms(2, rng), rng)
    origin = Origin("127.0.0.1:8448", generate_signing_key("a"))
    out = RequestFile()
    events.image_requests(factory, [origin], 40, out, media_server="media.test")
    first = orjson.loads(out.bodies[out.requests[0][0]])
    assert "/img-bad" in first["content"]["url"], first["content"]
    assert out.kinds["image_bad"] >= 1 and out.kinds["image_clean"] > 0


async def test_attacker_gives_up_a_connection_attempt_nobody_answers() -> None:
    # The gateway's kernel drop leaves a penalised attacker's attempts unanswered: the
    # attacker tries again after its connect timeout instead of hanging in connect().
    from warden.runtime.kernel_refusal import attach, build_program

    seen: dict[str, Any] = {"peers": set(), "big": 0}
    server = await asyncio.start_server(lambda r, w: _toy_gateway(seen, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    attach(server.sockets[0], build_program(["127.0.0.2"]))
    plan = _toy_plan(port, duration=2.5, connections=2, oversized_connections=1, mib=1)
    async with server:
        held = attack.reserve_ports(1)
        try:
            # Bounded well past the window plus one connect timeout.
            stats = await asyncio.wait_for(
                attack.Attacker(plan, [held[0].getsockname()[1]]).run(), 30
            )
        finally:
            held[0].close()
    assert seen["peers"] == set()  # nothing got through
    for name in attack.CLASSES:
        assert stats[name]["errors"]["connect"] >= 1, stats[name]
        assert stats[name]["statuses"] == {}, stats[name]


def test_the_gateway_takes_the_penalty_settings_from_the_benchs_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    bench = harness.Bench.__new__(harness.Bench)
    bench.servers = SimpleNamespace(redis_url="redis://r", nats_url="nats://n")  # type: ignore[assignment]
    bench.database_url, bench.hma = "postgres://d", None
    bench.fed_key = bench.policy_key = bench.ca_file = tmp_path / "k"  # type: ignore[attr-defined]
    bench.config = SimpleNamespace(rate_limit=0)  # type: ignore[assignment]
    monkeypatch.setenv("PS_HTTP_AUTH_FAILURE_KERNEL_DROP", "false")
    monkeypatch.setenv("PS_HTTP_AUTH_FAILURE_LIMIT", "7")
    monkeypatch.setenv("PS_API_KEY", "not-the-benchs")
    env = bench._gateway_env()
    assert env["PS_HTTP_AUTH_FAILURE_KERNEL_DROP"] == "false"
    assert env["PS_HTTP_AUTH_FAILURE_LIMIT"] == "7"
    assert "PS_HTTP_AUTH_FAILURE_PENALTY_SECONDS" not in env
    assert env["PS_API_KEY"] == harness.API_KEY  # other PS_* variables stay the bench's


def test_the_nats_request_micro_benchmark_measures_both_requesters() -> None:
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_NATS_URL": NATS_URL}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "libs"), str(ROOT)])
    done = subprocess.run(
        [sys.executable, "-m", "bench.nats_request"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"Client.request", "Requester"}
    for text in lines.values():
        assert re.fullmatch(r"\d+\.\d µs CPU per request \(\d+\.\d\)", text), text
        assert float(text.split()[0]) > 0
