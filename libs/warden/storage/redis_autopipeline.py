"""Redis auto-pipelining: single commands issued together share one round trip.

Under load a worker evaluates many events at once, and each filter that asks Redis
something (is the sender hellbanned? count this event in the rate window) would pay a
round trip of its own: a socket write, a read and redis-py's per-command overhead. A
``RedisAutoPipeline`` queues every command issued in one event-loop iteration and, on the
next (``loop.call_soon`` when the first one is queued), sends them all as one
non-transactional pipeline. Each caller awaits its own reply.

Semantics are those of sending each command alone, except for the round trip:

* not a transaction: commands of different callers are not atomic together (a Lua
  script is, as always, atomic by itself);
* a command Redis refuses (``ResponseError`` and subclasses such as ``NoScriptError``)
  fails only its own caller, with the exception redis-py raises for it;
* a connection error or timeout fails every caller of that pipeline with redis-py's
  exception (after redis-py's own retries, as for a single command);
* a caller cancelled before the flush is not sent.

At most ``max_batch`` commands go in one pipeline: a full batch is sent at once, without
waiting for the loop iteration to end.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

# A queued command: its arguments, redis-py's parse options and the caller's future.
_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class RedisAutoPipeline:
    """Queues single Redis commands and sends those of one loop iteration together."""

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._redis = redis
        self._max_batch = max_batch
        self._queue: list[_Queued] = []
        self._flush_handle: asyncio.Handle | None = None
        # Pipelines in flight, referenced so they are not garbage-collected mid-send.
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        """The client the commands go through."""
        return self._redis

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command (as ``Redis.execute_command``) in the next pipeline.

        Returns the reply parsed by redis-py's callback for the command; raises what
        redis-py raises for it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, options, future))
        if len(self._queue) >= self._max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return await future

    async def run_script(
        self, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()
    ) -> Any:
        """Run a Lua script (``EVALSHA``) in the next pipeline; its reply.

        On a Redis that does not have the script yet (first use, a restart, ``SCRIPT
        FLUSH``) the call gets ``NOSCRIPT`` and is sent again as ``EVAL``, which also
        makes Redis cache the script for the ``EVALSHA`` calls after it.
        """
        try:
            return await self.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute_command("EVAL", script.source, len(keys), *keys, *args)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a full batch flushed early: no empty flush
            self._flush_handle = None
        # Callers cancelled while queued (a filter timeout) need no reply.
        batch = [queued for queued in self._queue if not queued[2].done()]
        self._queue = []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for args, options, _ in batch:
            pipe.execute_command(*args, **options)  # queued: no command here is WATCH
        try:
            # Refused commands come back as exception objects in their own slots.
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            # The connection failed: every caller of this pipeline learns it.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (shutting down): so are the callers
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller gave up while the pipeline was out
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class Script:
    """A Lua script's source and SHA-1, for ``RedisAutoPipeline.run_script``.

    Holds no client, so a module can define its scripts as constants.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        # Redis names scripts by SHA-1; not used for security.
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
