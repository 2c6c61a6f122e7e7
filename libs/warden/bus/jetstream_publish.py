"""JetStream publishes whose acknowledgements are awaited together, not one by one.

``JetStreamContext.publish`` is a NATS request per message: a new inbox token, a
response future, a timer and a wait each, then the acknowledgement parsed into a
``PubAck``. A service publishing a stream of messages pays that per message. An
``AckedPublisher`` instead subscribes once to a wildcard inbox, sends each message with
a reply subject under it (a JetStream publish is exactly that on the wire) and resolves
one future per message when JetStream's acknowledgement, or its error, arrives. The
caller sends many, then waits for all their futures with one timeout.

Not nats-py's own ``publish_async`` (2.16): when the underlying publish raises (connection
closed, outbound buffer full while reconnecting) it keeps the message's future and
pending slot forever, and an error acknowledgement leaves the future unresolved.

Messages keep their headers (``Nats-Msg-Id`` deduplicates as with a plain publish). A
future fails with ``NoStreamResponseError`` when no stream takes the subject, with the
``APIError`` JetStream replied, or never resolves when no acknowledgement comes: callers
bound their wait and then ``give_up`` the messages still pending.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.errors import APIError, NoStreamResponseError

_NO_RESPONDERS = "503"  # the status NATS replies with when nobody took the message


@dataclasses.dataclass(eq=False, slots=True)
class PendingAck:
    """One published message awaiting its acknowledgement."""

    token: str
    future: asyncio.Future[None]  # None once JetStream stored the message


class AckedPublisher:
    """Publishes to JetStream subjects; acknowledgements arrive on one subscription."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix: str | None = None
        self._subscribing: asyncio.Lock | None = None
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[None]] = {}

    @property
    def waiting(self) -> int:
        """Messages sent whose acknowledgement has not arrived (nor been given up)."""
        return len(self._waiting)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> PendingAck:
        """Send one message; its acknowledgement resolves the returned future.

        Raises what ``Client.publish`` raises (nothing is left pending then).
        """
        prefix = self._prefix or await self._subscribe()
        token = str(next(self._tokens))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return PendingAck(token, future)

    def give_up(self, pending: PendingAck) -> None:
        """Stop waiting for this acknowledgement (cancels its future if still pending)."""
        self._waiting.pop(pending.token, None)
        pending.future.cancel()

    async def _subscribe(self) -> str:
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        async with self._subscribing:
            if self._prefix is None:
                prefix = self._nc.new_inbox() + "."
                # nats-py subscribes again after a reconnect, so this lasts.
                await self._nc.subscribe(prefix + "*", cb=self._on_reply)
                self._prefix = prefix
            return self._prefix

    async def _on_reply(self, msg: Msg) -> None:
        assert self._prefix is not None
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return  # given up on already
        if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError as exc:
            future.set_exception(exc)
            return
        if not isinstance(reply, dict):
            future.set_exception(APIError(description="not a JetStream acknowledgement"))
        elif reply.get("error") is None:
            future.set_result(None)
        else:
            future.set_exception(_api_error(reply["error"]))


def _api_error(error: object) -> APIError:
    """The ``APIError`` (subclass by code) nats-py raises for this error reply."""
    try:
        APIError.from_error(error)  # type: ignore[arg-type]  # raises; checked below
    except APIError as exc:
        return exc
    except (KeyError, TypeError):  # not the shape JetStream documents
        pass
    return APIError(description=f"unexpected JetStream error reply: {error!r}"[:200])
