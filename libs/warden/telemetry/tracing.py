"""OpenTelemetry tracing with W3C trace context carried in NATS message headers.

``PS_OTEL_EXPORTER=console`` prints finished spans (for debugging); ``none`` keeps the
SDK (so a trace sampled upstream still propagates through every hop) without exporting.

With no exporter, spans are not recorded unless their parent was sampled upstream
(``ParentBased(ALWAYS_OFF)``): a recording span costs tens of microseconds that nobody
would ever read (``make bench`` measured about 8% of the gateway's CPU per ``/sign``).
The gateway's ``/sign`` path goes further and makes no span at all then (``exporting``);
the other services' spans around each hop remain, non-recording, and a trace sampled by
a caller stays sampled through Warden.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False
_exporting = False


def build_tracer_provider(service: str, exporter: str = "none") -> TracerProvider:
    """The tracer provider for ``service`` with ``PS_OTEL_EXPORTER``'s exporter."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"warden-{service}"}),
        sampler=ParentBased(ALWAYS_ON if exporter != "none" else ALWAYS_OFF),
    )
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider


def configure_tracing(service: str, exporter: str = "none") -> None:
    """Install the tracer provider for this process (once)."""
    global _configured, _exporting
    if _configured:
        return
    trace.set_tracer_provider(build_tracer_provider(service, exporter))
    _exporting = exporter != "none"
    propagate.set_global_textmap(_PROPAGATOR)
    _configured = True


def exporting() -> bool:
    """Whether this process exports spans (``PS_OTEL_EXPORTER`` is not ``none``).

    Spans on the hottest path (``/sign``, including its hop to the workers) are made
    only then; elsewhere the spans around each hop to another service are always made.
    """
    return _exporting


def tracer(name: str) -> trace.Tracer:
    """A tracer for a module."""
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the current span's ``traceparent``/``tracestate`` to message headers."""
    carrier: dict[str, str] = dict(headers or {})
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by a message's headers (empty context when none)."""
    return _PROPAGATOR.extract(dict(headers or {}))
