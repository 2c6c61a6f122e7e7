"""The evaluation request/reply codec both sides of EVALUATE_SUBJECT use."""

from __future__ import annotations

import orjson
import pytest

from warden.bus.evaluation import (
    BadRequest,
    EvaluationRequest,
    WorkerError,
    decode_reply,
    decode_request,
    encode_error_reply,
)
from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict


def test_request_round_trip() -> None:
    pdu = orjson.dumps({"type": "m.room.message", "content": {"body": "hi"}})
    sent = EvaluationRequest(
        event_id="$abc",
        community_id="c1",
        reference_hash="hash",
        room_version="12",
        origin="origin.test",
        source="sign",
        pdu=pdu,
    )
    got = decode_request(pdu, sent.headers())
    assert got == sent  # every field survives (the parsed event is not compared)
    assert got.event == {"type": "m.room.message", "content": {"body": "hi"}}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{}", {"Warden-Community": "c"}, "Warden-Event-Id"),
        (b"{}", {"Warden-Event-Id": "$e"}, "Warden-Community"),
        (b"not json", {"Warden-Event-Id": "$e", "Warden-Community": "c"}, "not JSON"),
        (b"[1]", {"Warden-Event-Id": "$e", "Warden-Community": "c"}, "JSON object"),
    ],
)
def test_bad_requests_are_named(body: bytes, headers: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(body, headers)


def test_replies() -> None:
    verdict = Verdict("$e", ContentClass.PROHIBITED, (SPAM,))
    assert decode_reply(verdict.to_json()) == verdict
    with pytest.raises(WorkerError, match="no such community"):
        decode_reply(encode_error_reply("no such community"))
    for garbage in (b"", b"[]", b'{"event_id": "$e"}'):
        with pytest.raises(ValueError):  # noqa: PT011 - any unreadable reply
            decode_reply(garbage)


def test_reply_without_filter_outcomes_keeps_the_decision() -> None:
    outcome = FilterOutcome("keyword", ContentClass.PROHIBITED, (SPAM,), None, 0.5)
    verdict = Verdict("$e", ContentClass.PROHIBITED, (SPAM,), filters=(outcome,))
    assert decode_reply(verdict.to_json()).filters == (outcome,)
    slim = decode_reply(verdict.to_json(), with_filters=False)
    assert slim.filters == ()
    assert (slim.event_id, slim.content_class, slim.harms) == (
        verdict.event_id,
        verdict.content_class,
        verdict.harms,
    )


def test_dependency_failure_reply_carries_retry_after() -> None:
    with pytest.raises(WorkerError) as caught:
        decode_reply(encode_error_reply("redis down", retry_after_ms=5000))
    assert caught.value.retry_after_ms == 5000
    with pytest.raises(WorkerError) as caught:
        decode_reply(encode_error_reply("a bug"))
    assert caught.value.retry_after_ms is None
