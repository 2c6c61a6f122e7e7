"""``Requester``: request and reply over a real NATS server, as ``Client.request`` does."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from warden.bus.request_reply import Requester


def _subject() -> str:
    return f"test.request_reply.{uuid.uuid4().hex[:12]}"


async def test_each_request_gets_its_own_reply(nats_client: NATS) -> None:
    subject = _subject()
    seen_headers: list[dict[str, str] | None] = []

    async def answer(msg: Msg) -> None:
        seen_headers.append(msg.headers)
        await asyncio.sleep(0.001 * (int(msg.data) % 5))  # replies come back out of order
        await msg.respond(b"re:" + msg.data)

    sub = await nats_client.subscribe(subject, queue="q", cb=answer)
    requester = Requester(nats_client)
    try:
        replies = await asyncio.gather(
            *(
                requester.request(
                    subject, str(i).encode(), timeout_seconds=5, headers={"Warden-N": str(i)}
                )
                for i in range(50)
            )
        )
        assert [r.data for r in replies] == [f"re:{i}".encode() for i in range(50)]
        assert sorted(int(h["Warden-N"]) for h in seen_headers if h) == list(range(50))
        assert requester.in_flight == 0
    finally:
        await sub.unsubscribe()
        await requester.close()


async def test_no_reply_in_time_is_a_timeout_and_a_late_reply_is_dropped(
    nats_client: NATS,
) -> None:
    subject = _subject()
    held: list[Msg] = []

    async def hold(msg: Msg) -> None:
        held.append(msg)

    sub = await nats_client.subscribe(subject, cb=hold)
    requester = Requester(nats_client)
    try:
        start = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await requester.request(subject, b"x", timeout_seconds=0.2)
        assert 0.15 < time.monotonic() - start < 2
        assert requester.in_flight == 0
        # The reply that comes too late finds nobody waiting, and harms nothing.
        await held[0].respond(b"late")
        await nats_client.flush()
        await asyncio.sleep(0.05)

        # The requester still works.
        async def answer(msg: Msg) -> None:
            await msg.respond(b"ok")

        sub2 = await nats_client.subscribe(subject + ".b", cb=answer)
        assert (await requester.request(subject + ".b", b"", timeout_seconds=5)).data == b"ok"
        await sub2.unsubscribe()
    finally:
        await sub.unsubscribe()
        await requester.close()


async def test_nobody_subscribed_is_no_responders_at_once(nats_client: NATS) -> None:
    requester = Requester(nats_client)
    try:
        start = time.monotonic()
        with pytest.raises(nats.errors.NoRespondersError):
            await requester.request(_subject(), b"x", timeout_seconds=5)
        assert time.monotonic() - start < 2  # the server's 503, not the timeout
        assert requester.in_flight == 0
    finally:
        await requester.close()


async def test_a_cancelled_request_leaves_nothing_behind(nats_client: NATS) -> None:
    subject = _subject()

    async def ignore(msg: Msg) -> None:
        pass

    sub = await nats_client.subscribe(subject, cb=ignore)
    requester = Requester(nats_client)
    try:
        task = asyncio.create_task(requester.request(subject, b"x", timeout_seconds=30))
        while requester.in_flight == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert requester.in_flight == 0
    finally:
        await sub.unsubscribe()
        await requester.close()


async def test_requests_share_one_reply_subscription(
    nats_client: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request subscribes (once, even when many start together); the others
    reuse it: each request costs no SUB or UNSUB."""
    subject = _subject()

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    sub = await nats_client.subscribe(subject, cb=answer)
    requester = Requester(nats_client)
    subscribed: list[str] = []
    real_subscribe = nats_client.subscribe

    async def counting_subscribe(subject: str, *args: object, **kwargs: object) -> object:
        subscribed.append(subject)
        return await real_subscribe(subject, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nats_client, "subscribe", counting_subscribe)
    try:
        await asyncio.gather(
            *(requester.request(subject, b"", timeout_seconds=5) for _ in range(20))
        )
        await requester.request(subject, b"", timeout_seconds=5)
        assert len(subscribed) == 1 and subscribed[0].endswith(".*")
    finally:
        monkeypatch.undo()
        await sub.unsubscribe()
        await requester.close()
