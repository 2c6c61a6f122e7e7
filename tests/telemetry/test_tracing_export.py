"""Trace export settings: the sampler (PS_OTEL_SAMPLE_RATIO, OTEL_TRACES_SAMPLER), the
resource, the one-line console exporter, the per-request sampling decision of ``/sign``,
the incoming ``traceparent`` middleware and trace IDs in log lines."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.services.test_cli import run_warden
from warden.config_check import tracing_checks
from warden.settings import Settings
from warden.telemetry.logs import configure_logging
from warden.telemetry.metrics import WARDEN_VERSION
from warden.telemetry.trace_http import TraceContextMiddleware
from warden.telemetry.tracing import (
    _DecidedRoot,
    build_resource,
    build_sampler,
    build_tracer_provider,
    entry_context,
    extract_context,
    inject_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
UNSAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
NEW_TRACE = 0x0123456789ABCDEF0123456789ABCDEF


def _sampled(sampler: Sampler, traceparent: str | None = None) -> bool:
    parent = extract_context({"traceparent": traceparent}) if traceparent else None
    return sampler.should_sample(parent, NEW_TRACE, "span").decision is Decision.RECORD_AND_SAMPLE


# --- the sampler ---


def test_default_sampler_is_parent_based_with_the_ratio_for_new_traces() -> None:
    never = build_sampler("otlp", 0.0, env={})
    assert not _sampled(never)
    assert _sampled(never, SAMPLED)  # a caller sampled it: recorded
    assert not _sampled(never, UNSAMPLED)
    always = build_sampler("otlp", 1.0, env={})
    assert _sampled(always)
    assert not _sampled(always, UNSAMPLED)
    assert "TraceIdRatioBased{0.5}" in build_sampler("otlp", 0.5, env={}).get_description()


def test_otel_traces_sampler_and_its_argument_win_over_the_ratio() -> None:
    assert _sampled(build_sampler("otlp", 0.0, env={"OTEL_TRACES_SAMPLER": "always_on"}))
    # Not parent-based: a caller's unsampled trace is sampled anyway.
    assert _sampled(build_sampler("otlp", 0.0, env={"OTEL_TRACES_SAMPLER": "always_on"}), UNSAMPLED)
    off = build_sampler("console", 1.0, env={"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    assert not _sampled(off) and _sampled(off, SAMPLED)
    ratio_env = {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "1"}
    assert _sampled(build_sampler("otlp", 0.0, env=ratio_env))
    # The argument alone sets the default sampler's ratio.
    assert _sampled(build_sampler("otlp", 0.0, env={"OTEL_TRACES_SAMPLER_ARG": "1.0"}))


def test_without_an_exporter_new_traces_are_never_sampled_whatever_the_environment() -> None:
    sampler = build_sampler("none", 1.0, env={"OTEL_TRACES_SAMPLER": "always_on"})
    assert not _sampled(sampler)
    assert _sampled(sampler, SAMPLED)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER='jaeger_remote'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "often"}, "OTEL_TRACES_SAMPLER_ARG='often'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "within 0..1"),
    ],
)
def test_a_bad_sampler_setting_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_sampler("otlp", 0.1, env=env)
    [check] = tracing_checks(Settings(otel_exporter="otlp"), env)
    assert not check.ok and message in check.detail


def test_check_config_names_a_bad_sampler_and_accepts_a_good_one() -> None:
    assert (
        tracing_checks(Settings(otel_exporter="otlp"), {"OTEL_TRACES_SAMPLER": "always_on"}) == []
    )
    r = run_warden(
        "check-config",
        "--offline",
        env={"PS_OTEL_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"},
    )
    assert r.returncode == 1
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert any("OTEL_TRACES_SAMPLER='sometimes'" in line for line in failed), r.stdout


def test_a_service_with_a_bad_sampler_stops_with_one_log_line(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = {**service_env, "PS_OTEL_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}
    r = subprocess.run(
        [sys.executable, "-m", "warden", "moderator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1 and "OTEL_TRACES_SAMPLER='sometimes'" in errors[0]["message"]
    assert "Traceback" not in r.stderr


def test_settings_accept_otlp_and_bound_the_ratio() -> None:
    assert Settings(otel_exporter="otlp").otel_exporter == "otlp"
    assert Settings().otel_sample_ratio == 0.01
    with pytest.raises(ValidationError):
        Settings(otel_exporter="jaeger")
    with pytest.raises(ValidationError):
        Settings(otel_sample_ratio=1.5)


# --- the resource ---


def test_resource_names_the_service_its_version_and_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("HOSTNAME", raising=False)
    attributes = build_resource("filter-worker").attributes
    assert attributes["service.name"] == "warden-filter-worker"
    assert attributes["service.version"] == WARDEN_VERSION
    assert attributes["service.instance.id"] == socket.gethostname()
    monkeypatch.setenv("HOSTNAME", "warden-gateway-7d9f-x2k")  # the pod's name
    assert build_resource("gateway").attributes["service.instance.id"] == "warden-gateway-7d9f-x2k"


def test_otel_service_name_and_resource_attributes_are_respected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-policy")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "service.version=9.9,deployment.environment=prod"
    )
    attributes = build_resource("gateway").attributes
    assert attributes["service.name"] == "edge-policy"
    assert attributes["service.version"] == "9.9"
    assert attributes["deployment.environment"] == "prod"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")
    assert build_resource("gateway").attributes["service.name"] == "from-attributes"


# --- the console exporter ---


def test_console_spans_are_one_json_line_each_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider = build_tracer_provider("gateway", "console", 1.0)
    tracer = provider.get_tracer(__name__)
    with (
        tracer.start_as_current_span("policy.sign"),
        tracer.start_as_current_span("policy.evaluate"),
    ):
        pass
    provider.shutdown()
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["policy.evaluate", "policy.sign"]


# --- the per-request decision on /sign ---


class _OnceThenNever(Sampler):
    """Samples the first decision only: a second draw for the same trace would show."""

    def __init__(self) -> None:
        self.calls = 0

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
        self.calls += 1
        decision = Decision.RECORD_AND_SAMPLE if self.calls == 1 else Decision.DROP
        return SamplingResult(decision, attributes, trace_state)

    def get_description(self) -> str:
        return "once"


def test_a_new_trace_sampled_at_the_entry_is_not_drawn_again() -> None:
    inner = _OnceThenNever()
    provider = TracerProvider(sampler=_DecidedRoot(inner))
    ctx, with_span = entry_context(provider.sampler)
    assert with_span and inner.calls == 1
    with provider.get_tracer(__name__).start_as_current_span("policy.sign", context=ctx) as span:
        assert span.is_recording()
        assert int(inject_headers()["traceparent"].rsplit("-", 1)[1], 16) & 0x01
    assert inner.calls == 1


def test_a_new_trace_not_sampled_at_the_entry_makes_no_span_but_travels_unsampled() -> None:
    ctx, with_span = entry_context(build_sampler("otlp", 0.0, env={}))
    assert not with_span
    token = context.attach(ctx)
    try:
        assert not trace.get_current_span().is_recording()
        _, trace_id, span_id, flags = inject_headers()["traceparent"].split("-")
    finally:
        context.detach(token)
    assert int(trace_id, 16) != 0 and int(span_id, 16) != 0
    assert int(flags, 16) & 0x01 == 0  # the workers do not sample it on their own


def test_a_callers_trace_context_is_left_to_the_sampler() -> None:
    token = context.attach(extract_context({"traceparent": UNSAMPLED}))
    try:
        ctx, with_span = entry_context(build_sampler("otlp", 1.0, env={}))
        assert with_span and ctx is context.get_current()
    finally:
        context.detach(token)


# --- incoming traceparent on HTTP ---


async def _echo(request: Request) -> Response:
    return JSONResponse(inject_headers())


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = TraceContextMiddleware(Starlette(routes=[Route("/any", _echo)]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_an_incoming_traceparent_is_the_requests_trace_context(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/any", headers={"traceparent": SAMPLED, "tracestate": "vendor=1"})
    assert r.json() == {"traceparent": SAMPLED, "tracestate": "vendor=1"}
    assert (await client.get("/any")).json() == {}  # none sent, none made up
    assert (await client.get("/any", headers={"traceparent": "garbage"})).json() == {}
    # Detached afterwards: nothing leaks into the next request.
    assert (await client.get("/any")).json() == {}


# --- trace IDs in log lines ---


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    configure_logging("gateway", "INFO")
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)


def test_log_lines_carry_the_ids_of_a_sampled_span(log_lines: io.StringIO) -> None:
    tracer = build_tracer_provider("gateway", "none").get_tracer(__name__)
    log = logging.getLogger("warden.test")
    with tracer.start_as_current_span("x", context=extract_context({"traceparent": SAMPLED})) as s:
        log.info("inside")
    with tracer.start_as_current_span("y", context=extract_context({"traceparent": UNSAMPLED})):
        log.info("not sampled")
    log.info("outside")
    inside, unsampled, outside = (json.loads(line) for line in log_lines.getvalue().splitlines())
    assert inside["trace_id"] == TRACE_ID
    assert inside["span_id"] == format(s.get_span_context().span_id, "016x")
    for line in (unsampled, outside):
        assert "trace_id" not in line and "span_id" not in line


def test_sign_request_refuses_a_header_without_a_name() -> None:
    r = run_warden(
        "sign-request",
        *("--build-event", "--room", "!room:origin.test", "--url", "http://127.0.0.1:1/x"),
        *("--header", "traceparent 00-abc"),
    )
    assert r.returncode == 2
    assert "--header: 'traceparent 00-abc' is not NAME:VALUE" in r.stderr
