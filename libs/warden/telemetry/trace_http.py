"""ASGI middleware that serves a request in the trace context its caller sent.

Only a request with a ``traceparent`` header pays for parsing it; every other request
costs one scan of its header list. The context is attached for the request's whole
handling, so spans made by the handlers become children of the caller's span and the
context travels on in NATS headers (``inject_headers``).
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import context
from opentelemetry.context import Context
from starlette.types import ASGIApp, Receive, Scope, Send

from warden.telemetry.tracing import extract_context

_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"


def incoming_trace_context(headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
    """The trace context an HTTP request's ``traceparent`` carries, or None without one."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == _TRACEPARENT:
            carrier["traceparent"] = value.decode("latin-1")
        elif name == _TRACESTATE:
            carrier["tracestate"] = value.decode("latin-1")
    if "traceparent" not in carrier:
        return None
    return extract_context(carrier)


class TraceContextMiddleware:
    """Attach the W3C trace context of an incoming HTTP request, when it has one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, in the caller's trace context if the request carries one."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = incoming_trace_context(scope["headers"])
        if incoming is None:
            await self.app(scope, receive, send)
            return
        token = context.attach(incoming)
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)
