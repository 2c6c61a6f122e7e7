"""One socket write per HTTP response, not two.

uvicorn's httptools protocol writes a response's status line and headers when the app
sends ``http.response.start`` and its body when it sends ``http.response.body``: two
``transport.write`` calls, and with uvloop each is a ``write`` system call of its own
(``strace``: two per response). py-spy put those two calls at about a fifth of the
gateway's CPU for a repeated ``/sign`` (the ``make bench`` spam wave); a no-op ASGI app
under wrk served 30,300 requests/s with two writes and 36,200 with one.

``CoalescingHttpToolsProtocol`` is uvicorn's protocol with its transport wrapped: writes
made during one event-loop iteration are kept and handed to the real transport together
when the iteration's callbacks have run (``loop.call_soon``). Closing, or ending the
write side, first hands over what is pending, so nothing is lost or reordered; a
transport that is already closing gets nothing, as it would have dropped it. Every
other transport method is the real transport's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one loop iteration reach the socket as one."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` for the write at the end of this loop iteration."""
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Any) -> None:
        """As ``write``, for each item."""
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what was written so far to the real transport, as one write."""
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        """The real transport's buffer plus what waits for this iteration's write."""
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def close(self) -> None:
        """Write what is pending, then close (the transport sends it before closing)."""
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Write what is pending, then end the write side."""
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        """Drop what is pending and abort, as the real transport drops its buffer."""
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response with one system call."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Serve the connection through a ``CoalescingTransport``."""
        wrapped: Any = CoalescingTransport(transport, self.loop)
        super().connection_made(wrapped)
