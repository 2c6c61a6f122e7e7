"""Background verdict publication: windows of messages whose JetStream acknowledgements
are awaited together, each verdict marked only once acknowledged, failures retried and
left to the outbox sweeper, nothing kept after its window."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import APIError, NoStreamResponseError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from tests.filter_worker.test_worker_processes import stream_messages_for, verdict_stream_marks
from tests.service_processes import free_port
from warden.bus.jetstream_publish import AckedPublisher
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import VERDICT_SUBJECT_PREFIX, verdict_subject
from warden.dev import embedded
from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden_filter_worker.publisher import VerdictPublisher


def verdict(prohibited: bool = False) -> Verdict:
    cls = ContentClass.PROHIBITED if prohibited else ContentClass.NEUTRAL
    harms = (SPAM,) if prohibited else ()
    return Verdict(
        event_id=f"${uuid.uuid4().hex}",
        content_class=cls,
        harms=harms,
        filters=(FilterOutcome("keyword", cls, harms),),
        room_id="!publisher:test",
        community_id="default",
        sender="@someone:elsewhere.test",
        event_type="m.room.message",
        origin="origin.test",
        first_seen_ts=1,
        extra={"source": "sign"},
    )


def failures(final: str) -> float:
    value = REGISTRY.get_sample_value("warden_verdict_publish_failures_total", {"final": final})
    return value or 0.0


@pytest.fixture
async def bare_nats() -> AsyncIterator[NATS]:
    """A connection to a NATS server of our own without JetStream: nothing acknowledges."""
    port = free_port()
    server = subprocess.Popen(
        [str(embedded.nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            yield nc
        finally:
            await nc.close()
    finally:
        server.terminate()
        server.wait(5)


async def test_a_backlog_is_published_in_windows_and_marked_once_acknowledged(
    nats_client: NATS,
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    first_seq = await verdict_stream_marks(js)
    requests = 0
    request = nats_client.request

    async def counting_request(*args: Any, **kwargs: Any) -> Any:
        nonlocal requests
        requests += 1
        return await request(*args, **kwargs)

    nats_client.request = counting_request  # type: ignore[method-assign]
    acked: list[str] = []
    publisher = VerdictPublisher(nats_client, on_published=acked.append, max_in_flight=16)
    verdicts = [verdict(prohibited=i % 5 == 0) for i in range(40)]
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("evaluate") as span:
        traced = trace.set_span_in_context(span)
    for i, v in enumerate(verdicts):
        message = v.to_json_pair()[1]
        publisher.publish_later(v, message if i % 2 else None, traced if i == 0 else None)
    publisher.publish_later(verdicts[1], verdicts[1].to_json())  # published twice
    assert publisher.pending == 41 and acked == []  # nothing sent before the loop runs

    await publisher.close()

    # 41 messages in windows of at most 16, no NATS request per message.
    assert (publisher.windows, publisher.acknowledged, requests) == (3, 41, 0)
    assert publisher.pending == 0
    assert sorted(acked) == sorted([v.event_id for v in verdicts] + [verdicts[1].event_id])
    for i, v in enumerate(verdicts):
        (stored,) = await stream_messages_for(nats_client, first_seq, v.event_id)  # deduped
        assert stored.subject == verdict_subject(v.content_class.label)
        assert stored.data == v.to_json()  # extras included
        assert ("traceparent" in stored.headers) is (i == 0)
        if i == 0:
            trace_id = format(span.get_span_context().trace_id, "032x")
            assert trace_id in stored.headers["traceparent"]


async def test_unacknowledged_publications_are_retried_then_left_to_the_sweeper(
    bare_nats: NATS,
) -> None:
    # Something takes the messages but never acknowledges them (not JetStream).
    swallowed: list[tuple[str, dict[str, str]]] = []

    async def swallow(msg: Any) -> None:
        swallowed.append((msg.headers["Nats-Msg-Id"], msg.headers))

    await bare_nats.subscribe(VERDICT_SUBJECT_PREFIX + "*", cb=swallow)
    acked: list[str] = []
    publisher = VerdictPublisher(
        bare_nats,
        on_published=acked.append,
        ack_timeout_seconds=0.2,
        retry_budget_seconds=1.0,
    )
    before = failures("false"), failures("true")
    verdicts = [verdict() for _ in range(5)]
    with TracerProvider().get_tracer("test").start_as_current_span("evaluate") as span:
        traced = trace.set_span_in_context(span)
    for i, v in enumerate(verdicts):
        publisher.publish_later(v, None, traced if i == 0 else None)

    await publisher.close()

    assert acked == []  # never marked published: the outbox sweeper will publish them
    assert publisher.windows == 1 and publisher.acknowledged == 0
    assert publisher._acked.waiting == 0  # nothing left waiting for an acknowledgement
    assert failures("false") - before[0] >= 10  # the window's attempt and retries, each
    assert failures("true") - before[1] == 5  # then given up
    assert len(swallowed) >= 10
    # Every attempt, retries included, carried its Nats-Msg-Id and the first its trace.
    attempts = [h for event_id, h in swallowed if event_id == verdicts[0].event_id]
    assert len(attempts) >= 2
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert all(trace_id in h.get("traceparent", "") for h in attempts)
    assert {event_id for event_id, _ in swallowed} == {v.event_id for v in verdicts}


async def test_acknowledgement_errors_reach_their_own_message(
    nats_client: NATS, bare_nats: NATS
) -> None:
    await ensure_verdicts_stream(nats_client.jetstream())
    acks = AckedPublisher(nats_client)
    good = await acks.publish(
        verdict_subject("neutral"), b"{}", {"Nats-Msg-Id": f"${uuid.uuid4().hex}"}
    )
    # JetStream refuses a message expecting another stream; it stores nothing.
    refused_id = f"${uuid.uuid4().hex}"
    refused = await acks.publish(
        verdict_subject("neutral"),
        b"{}",
        {"Nats-Msg-Id": refused_id, "Nats-Expected-Stream": "NOT_THE_VERDICTS"},
    )
    await asyncio.wait_for(asyncio.gather(good.future, refused.future, return_exceptions=True), 5)
    assert good.future.result() is None
    assert isinstance(refused.future.exception(), APIError)
    assert acks.waiting == 0

    # No stream (no JetStream at all) answers at once: no waiting for a timeout.
    nobody = AckedPublisher(bare_nats)
    pending = await nobody.publish(verdict_subject("neutral"), b"{}")
    with pytest.raises(NoStreamResponseError):
        await asyncio.wait_for(pending.future, 5)
    assert nobody.waiting == 0


async def test_a_closed_connection_leaves_nothing_pending(nats_client: NATS) -> None:
    closing = await nats.connect(str(nats_client.connected_url.geturl()))
    acks = AckedPublisher(closing)
    first = await acks.publish(verdict_subject("neutral"), orjson.dumps({}))  # subscribes
    acks.give_up(first)
    await closing.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await acks.publish(verdict_subject("neutral"), b"{}")
    assert acks.waiting == 0
