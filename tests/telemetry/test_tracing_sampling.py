"""Which spans are recorded: none without an exporter, unless a caller sampled the trace."""

from __future__ import annotations

from opentelemetry import trace

from warden.telemetry.tracing import build_tracer_provider, extract_context, inject_headers

SAMPLED_PARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
UNSAMPLED_PARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}


def test_without_an_exporter_root_spans_are_not_recorded_but_still_propagate() -> None:
    tracer = build_tracer_provider("gateway", "none").get_tracer(__name__)
    with tracer.start_as_current_span("policy.sign") as span:
        assert not span.is_recording()
        headers = inject_headers()
    # The next hop still gets a trace ID, with the sampled flag (0x01) clear.
    version, trace_id, _span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and int(trace_id, 16) != 0
    assert int(flags, 16) & 0x01 == 0


def test_without_an_exporter_a_trace_sampled_upstream_stays_sampled() -> None:
    tracer = build_tracer_provider("filter-worker", "none").get_tracer(__name__)
    with tracer.start_as_current_span(
        "filter-worker.evaluate", context=extract_context(SAMPLED_PARENT)
    ) as span:
        assert span.is_recording()
        assert span.get_span_context().trace_id == int("4bf92f3577b34da6a3ce929d0e0e4736", 16)
        assert inject_headers()["traceparent"].endswith("-01")
    with tracer.start_as_current_span(
        "filter-worker.evaluate", context=extract_context(UNSAMPLED_PARENT)
    ) as span:
        assert not span.is_recording()


def test_with_the_console_exporter_every_span_is_recorded() -> None:
    tracer = build_tracer_provider("gateway", "console").get_tracer(__name__)
    with tracer.start_as_current_span("policy.sign") as span:
        assert span.is_recording()
        assert isinstance(span, trace.Span)
