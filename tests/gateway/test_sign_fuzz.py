"""Fuzzing the policy API: nothing a client sends may produce a 5xx (503 aside).

Three kinds of input: arbitrary bytes and headers (stopped early), arbitrary JSON with
valid X-Matrix signatures over it (so it reaches room lookup and PDU validation), and
mutations of a valid, signed PDU in a protected room re-signed for X-Matrix (so they
reach hashing, signature checks and the verdict).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    UNSTABLE_SIGN_PATH,
    Gateway,
    Origin,
    StandInWorker,
    new_room_id,
)
from warden.matrix.keys import POLICY_SERVER_KEY_ID

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]

CHECK_PREFIX = "/_matrix/policy/unstable/org.matrix.msc4284/event/"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
header_values = st.one_of(
    printable,
    st.builds(lambda s: "X-Matrix " + s, printable),
    st.builds(
        lambda o, k, s: f'X-Matrix origin="{o}",key="{k}",sig="{s}",destination="warden.test"',
        printable,
        printable,
        printable,
    ),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
paths = st.one_of(
    st.sampled_from([SIGN_PATH, UNSTABLE_SIGN_PATH]),
    st.builds(lambda s: CHECK_PREFIX + s.replace("/", "%2F") + "/check", printable),
)
PDU_KEYS = [
    "type",
    "room_id",
    "sender",
    "content",
    "origin_server_ts",
    "depth",
    "prev_events",
    "auth_events",
    "hashes",
    "signatures",
    "state_key",
    "unsigned",
    "redacts",
    "event_id",
]


def assert_not_a_server_error(response: Any) -> None:
    # Shown by --hypothesis-show-statistics: how deep the examples got.
    event(f"status {response.status_code}")
    assert response.status_code < 500 or response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body.get("errcode"), str) and body["errcode"].startswith("M_")
        assert isinstance(body.get("error"), str)


@pytest.fixture
async def fuzz_setup(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> tuple[Gateway, Origin, dict[str, Any], str]:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    template = origin.event(room_id, "12")
    # Warm the keyring so examples do not each wait for a key fetch.
    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(template), headers=origin.headers(SIGN_PATH, template)
    )
    assert r.status_code == 200
    return gateway, origin, template, room_id


@FUZZ
@given(
    path=paths,
    body=st.one_of(st.binary(max_size=300), st.builds(orjson.dumps, json_values)),
    authorization=st.lists(header_values, max_size=3),
    content_type=st.one_of(st.none(), printable),
)
async def test_arbitrary_requests(
    fuzz_setup: tuple[Gateway, Origin, dict[str, Any], str],
    path: str,
    body: bytes,
    authorization: list[str],
    content_type: str | None,
) -> None:
    gateway = fuzz_setup[0]
    headers = [("Authorization", value) for value in authorization]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    r = await gateway.client.post(path, content=body, headers=headers)
    assert_not_a_server_error(r)
    if r.status_code == 200:
        assert r.json() == {"recommendation": "ok"} or GATEWAY_NAME in r.json()


@FUZZ
@given(path=st.sampled_from([SIGN_PATH, UNSTABLE_SIGN_PATH]), value=json_values)
async def test_authenticated_arbitrary_json(
    fuzz_setup: tuple[Gateway, Origin, dict[str, Any], str], path: str, value: Any
) -> None:
    gateway, origin = fuzz_setup[0], fuzz_setup[1]
    try:
        auth = origin.auth(path, value)
    except ValueError:  # floats cannot be signed canonically: send it anyway
        auth = origin.auth(path, {})
    r = await gateway.client.post(
        path, content=orjson.dumps(value), headers={"Authorization": auth}
    )
    assert_not_a_server_error(r)
    assert r.status_code != 200 or r.json() == {}


@FUZZ
@given(
    drops=st.lists(st.sampled_from(PDU_KEYS), max_size=3, unique=True),
    replacements=st.dictionaries(st.sampled_from(PDU_KEYS), json_values, max_size=3),
    resign_event=st.booleans(),
)
async def test_mutated_pdus(
    fuzz_setup: tuple[Gateway, Origin, dict[str, Any], str],
    drops: list[str],
    replacements: dict[str, Any],
    resign_event: bool,
) -> None:
    gateway, origin, template, _ = fuzz_setup
    event = copy.deepcopy(template)
    for key in drops:
        event.pop(key, None)
    event.update(replacements)
    if resign_event:
        # Re-hash and re-sign as the origin, so the mutation reaches the later checks.
        event.pop("hashes", None)
        event.pop("signatures", None)
        try:
            add_hashes_and_signatures(SYNAPSE_VERSIONS["12"], event, origin.name, origin.key)
        except Exception:
            event = copy.deepcopy(template)
            event.update(replacements)
    try:
        headers = origin.headers(SIGN_PATH, event)
    except ValueError:
        headers = origin.headers(SIGN_PATH, {})
    r = await gateway.client.post(SIGN_PATH, content=orjson.dumps(event), headers=headers)
    assert_not_a_server_error(r)
    if r.status_code == 200:
        assert list(r.json()[GATEWAY_NAME]) == [POLICY_SERVER_KEY_ID]
