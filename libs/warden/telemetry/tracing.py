"""OpenTelemetry tracing with W3C trace context carried in HTTP and NATS message headers.

``PS_OTEL_EXPORTER`` picks where finished spans go:

* ``otlp``: OTLP/HTTP (protobuf) to a collector, batched in a background thread. The
  exporter reads the standard variables itself: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL,
  ``/v1/traces`` is appended), ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (full URL),
  ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``..._COMPRESSION``,
  ``..._CERTIFICATE``; the batch processor reads ``OTEL_BSP_*``.
* ``console``: one compact JSON object per span on stderr (debugging), so that stdout
  keeps one JSON log line per event.
* ``none``: the SDK stays (a trace sampled upstream still propagates through every hop),
  nothing is exported.

Sampling: ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` when set, else
``parentbased_traceidratio`` with ``PS_OTEL_SAMPLE_RATIO``: a trace a caller sampled
(``traceparent`` with the sampled flag) is recorded, and a new trace is recorded at that
ratio. With ``none``, new traces are never recorded (``ParentBased(ALWAYS_OFF)``): a
recording span costs tens of microseconds that nobody would read (``make bench``
measured about 8% of the gateway's CPU per ``/sign``).

The gateway's ``/sign`` path decides once per request whether a new trace is sampled
(``entry_context``) and makes no span object at all when it is not; the unsampled trace
context still travels to the workers, so that they do not start traces of their own.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from warden.telemetry.metrics import WARDEN_VERSION

EXPORTERS = frozenset({"none", "console", "otlp"})
DEFAULT_SAMPLER = "parentbased_traceidratio"
SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)

_PROPAGATOR = TraceContextTextMapPropagator()
# Set by ``entry_context`` on a context whose root span it decided to sample, so that the
# sampler does not draw a second time (which would sample ratio² of the traces).
_SAMPLED_ROOT_KEY = context.create_key("warden-sampled-root")
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)

_configured = False
_exporting = False
_sampler: Sampler = ParentBased(ALWAYS_OFF)


class _DecidedRoot(Sampler):
    """``inner``, except that a root span ``entry_context`` already sampled is sampled."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """The inner sampler's decision unless the root was decided already."""
        if parent_context is not None and parent_context.get(_SAMPLED_ROOT_KEY):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """The inner sampler's description."""
        return self.inner.get_description()


def build_sampler(exporter: str, ratio: float, env: Mapping[str, str] | None = None) -> Sampler:
    """The sampler: ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) when set, else parent-based
    with ``ratio`` for new traces; new traces are never sampled without an exporter.

    ``OTEL_TRACES_SAMPLER_ARG`` defaults to ``ratio`` (``PS_OTEL_SAMPLE_RATIO``). An
    unknown sampler name or a ratio outside 0..1 is a ``ValueError``.
    """
    if exporter == "none":
        return ParentBased(ALWAYS_OFF)
    env = os.environ if env is None else env
    name = (env.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER).strip().lower()
    if name not in SAMPLERS:
        known = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r} is not supported; use one of {known}")
    arg = (env.get("OTEL_TRACES_SAMPLER_ARG") or "").strip()
    if arg:
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the trace sampling ratio must be within 0..1, not {ratio}")
    root: Sampler = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return _DecidedRoot(ParentBased(root) if name.startswith("parentbased_") else root)


def instance_id() -> str:
    """``service.instance.id``: the host name, which is the pod's name on Kubernetes."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def build_resource(service: str) -> Resource:
    """``service.name`` (``warden-<service>``), ``service.version`` and
    ``service.instance.id``, each unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` sets it."""
    ours = {
        "service.name": f"warden-{service}",
        "service.version": WARDEN_VERSION,
        "service.instance.id": instance_id(),
    }
    from_env = OTELResourceDetector().detect().attributes
    return Resource.create({k: v for k, v in ours.items() if k not in from_env})


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def build_tracer_provider(
    service: str, exporter: str = "none", sample_ratio: float = 1.0
) -> TracerProvider:
    """The tracer provider for ``service`` with ``PS_OTEL_EXPORTER``'s exporter."""
    if exporter not in EXPORTERS:
        raise ValueError(f"PS_OTEL_EXPORTER must be one of {', '.join(sorted(EXPORTERS))}")
    provider = TracerProvider(
        resource=build_resource(service), sampler=build_sampler(exporter, sample_ratio)
    )
    if exporter == "console":
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr, formatter=_one_line))
        )
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def configure_tracing(service: str, exporter: str = "none", sample_ratio: float = 1.0) -> None:
    """Install the tracer provider for this process (once)."""
    global _configured, _exporting, _sampler
    if _configured:
        return
    provider = build_tracer_provider(service, exporter, sample_ratio)
    trace.set_tracer_provider(provider)
    _exporting = exporter != "none"
    _sampler = provider.sampler
    propagate.set_global_textmap(_PROPAGATOR)
    _configured = True


def exporting() -> bool:
    """Whether this process exports spans (``PS_OTEL_EXPORTER`` is not ``none``).

    Spans on the hottest path (``/sign``, including its hop to the workers) are made
    only then; elsewhere the spans around each hop to another service are always made.
    """
    return _exporting


def entry_context(sampler: Sampler | None = None) -> tuple[context.Context, bool]:
    """The context to serve a request in, and whether to make a span for it.

    With a trace context from the caller (attached by ``TraceContextMiddleware``) the
    span is made and the sampler decides as for any child. Otherwise the sampler is
    asked once, here: if the new trace is sampled the returned context makes the span's
    sampler agree; if not, no span is made and the returned context holds an unsampled
    trace, which ``inject_headers`` passes on so that the next hop does not sample it.
    """
    current = context.get_current()
    if trace.get_current_span(current).get_span_context().is_valid:
        return current, True
    trace_id = random.getrandbits(128) or 1
    result = (sampler or _sampler).should_sample(None, trace_id, "entry")
    if result.decision is Decision.RECORD_AND_SAMPLE:
        return context.set_value(_SAMPLED_ROOT_KEY, True, current), True
    span_context = SpanContext(
        trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=_UNSAMPLED
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), current), False


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


def caller_span(headers: Mapping[str, str] | None) -> trace.Span:
    """The caller's span as a message's headers carry it, instead of a span of our own
    (for the ``/sign`` hop when not ``exporting``): set in a context, it passes the
    caller's trace on to the next hop. ``INVALID_SPAN`` when the headers carry none.

    A span of our own (ids, sampler, attributes) cost a filter worker about 6 µs per
    request, for nobody when no exporter is set.
    """
    if not headers or "traceparent" not in headers:
        return trace.INVALID_SPAN
    return trace.get_current_span(extract_context(headers))
