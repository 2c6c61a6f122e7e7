"""A verdict's filter outcomes are serialised once, and every JSON form of it (reply,
cache, JetStream message, table row) keeps the exact bytes and values it always had."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden.storage import verdicts


def sample(event_id: str = "$event", **changes: Any) -> Verdict:
    values: dict[str, Any] = {
        "event_id": event_id,
        "content_class": ContentClass.PROHIBITED,
        "harms": ("org.matrix.msc4456.spam",),
        "filters": (
            FilterOutcome(
                "keyword", ContentClass.PROHIBITED, ("org.matrix.msc4456.spam",), None, 0.12345
            ),
            FilterOutcome("mentions", ContentClass.NEUTRAL, (), "TimeoutError: slow", 2000.0),
            FilterOutcome("sender_prefilter", ContentClass.ALLOWED),
        ),
        "room_id": "!r:x",
        "community_id": "default",
        "sender": "@u:x",
        "event_type": "m.room.message",
        "origin": "o.example",
        "reference_hash": "abc",
        "first_seen_ts": 17,
        "extra": {"source": "sign", "body_excerpt": "buy now"},
    }
    values.update(changes)
    return Verdict(**values)


EXPECTED_PLAIN = (
    b'{"event_id":"$event","class":"prohibited","harms":["org.matrix.msc4456.spam"],'
    b'"filters":[{"name":"keyword","class":"prohibited","harms":["org.matrix.msc4456.spam"],'
    b'"duration_ms":0.123},{"name":"mentions","class":"neutral","harms":[],'
    b'"duration_ms":2000.0,"error":"TimeoutError: slow"},{"name":"sender_prefilter",'
    b'"class":"allowed","harms":[],"duration_ms":0.0}],"room_id":"!r:x",'
    b'"community_id":"default","sender":"@u:x","event_type":"m.room.message",'
    b'"origin":"o.example","reference_hash":"abc","first_seen_ts":17'
)


def test_the_json_bytes_are_unchanged() -> None:
    v = sample()
    extra = b',"extra":{"source":"sign","body_excerpt":"buy now"}}'
    assert v.to_json() == EXPECTED_PLAIN + extra
    assert v.to_json_pair() == (EXPECTED_PLAIN + b"}", EXPECTED_PLAIN + extra)
    plain = sample(extra={})
    assert plain.to_json() == EXPECTED_PLAIN + b"}"
    assert plain.to_json_pair() == (EXPECTED_PLAIN + b"}", EXPECTED_PLAIN + b"}")
    assert [c.label for c in ContentClass] == ["neutral", "allowed", "prohibited"]
    assert all(ContentClass.from_label(c.label) is c for c in ContentClass)


_text = st.text(max_size=12)
_outcomes = st.builds(
    FilterOutcome,
    name=_text,
    content_class=st.sampled_from(ContentClass),
    harms=st.lists(_text, max_size=3).map(tuple),
    error=st.none() | _text,
    duration_ms=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(
    filters=st.lists(_outcomes, max_size=6).map(tuple),
    extra=st.dictionaries(_text, _text, max_size=3),
    content_class=st.sampled_from(ContentClass),
)
def test_every_json_form_is_the_dict_form_dumped(
    filters: tuple[FilterOutcome, ...], extra: dict[str, str], content_class: ContentClass
) -> None:
    v = sample(filters=filters, extra=extra, content_class=content_class)
    d = v.to_dict()
    assert v.to_json() == orjson.dumps(d)
    d.pop("extra", None)
    assert v.to_json_pair() == (orjson.dumps(d), v.to_json())
    assert Verdict.from_json(v.to_json()).to_json() == v.to_json()


async def test_outcomes_are_serialised_once_for_reply_message_and_row(
    pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    to_dict = FilterOutcome.to_dict

    def counting(self: FilterOutcome) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return to_dict(self)

    monkeypatch.setattr(FilterOutcome, "to_dict", counting)
    v = sample(f"${uuid.uuid4().hex}")
    # What the worker does with a first-time verdict: commit it, then reply and publish.
    won = await verdicts.insert_verdicts(pg_pool, [v])
    stored, message = v.to_json_pair()
    assert won[v.event_id] is v
    assert calls == len(v.filters)

    # The row holds the same outcomes (rounded as in the JSON), and reads back as itself.
    filters = await pg_pool.fetchval("SELECT filters FROM verdicts WHERE event_id = $1", v.event_id)
    assert orjson.loads(filters) == orjson.loads(stored)["filters"]
    read = await verdicts.get_verdict(pg_pool, v.event_id)
    assert read is not None and read.to_json() == stored
    assert orjson.loads(message)["extra"] == v.extra
