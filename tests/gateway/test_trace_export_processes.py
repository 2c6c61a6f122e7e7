"""Traces exported over OTLP/HTTP by a real gateway and filter worker (processes), to a
real local receiver: a caller's ``traceparent`` on ``/sign`` is honoured through NATS to
the worker, new traces follow the sampler, and the standard ``OTEL_*`` variables apply."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable

import httpx
import orjson
import pytest
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    parse_output,
    run_command,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_receiver  # noqa: F401
from tests.service_processes import ServiceProcess
from warden.telemetry.metrics import WARDEN_VERSION

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3


def _traceparent(sampled: bool) -> tuple[str, str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def _of(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.trace_id == trace_id}


def _log_lines(output: str) -> list[dict[str, object]]:
    lines = []
    for line in output.splitlines():
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


@pytest.mark.slow
async def test_sign_with_traceparent_is_traced_through_the_worker(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    otlp_receiver: OtlpReceiver,  # noqa: F811
) -> None:
    otel = {
        "PS_OTEL_EXPORTER": "otlp",
        "PS_OTEL_SAMPLE_RATIO": "0",  # new traces: none; a caller's sampled trace: kept
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=t0ken",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within moments, not every 5 s
    }
    # At DEBUG the worker logs every verdict, neutral ones too (refusals only at INFO).
    worker = spawn_service("filter-worker", PS_LOG_LEVEL="DEBUG", **otel)
    gateway = spawn_service(
        "gateway", PS_API_KEY="k", OTEL_SERVICE_NAME="edge-policy", **otel, **DEV_ORIGIN_ENV
    )
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            f"{gateway.api_url}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
            json={"room_version": "12", "community_id": "default"},
            headers={"Authorization": "Bearer k"},
        )
        assert r.status_code == 200, r.text
    url = f"{gateway.api_url}{SIGN_PATH}"

    async def sign(text: str, *headers: str) -> None:
        args = ["--url", url, "--build-event", "--room", room_id, "--body-text", text]
        for header in headers:
            args += ["--header", header]
        _, stdout, stderr = await run_command(service_env, *args)
        status, body = parse_output(stdout)
        assert status == 200, (stdout, stderr, gateway.output(), worker.output())
        assert GATEWAY_NAME in body

    # 1. A caller's sampled trace: the gateway's span is its child, the worker's span a
    # child of the gateway's request to the workers (trace context in NATS headers).
    first, first_trace, caller_span = _traceparent(sampled=True)
    await sign("a traced message", f"traceparent: {first}")
    spans = otlp_receiver.wait_for(
        lambda got: (
            {"policy.sign", "policy.evaluate", "filter-worker.evaluate"}
            <= _of(got, first_trace).keys()
        )
    )
    traced = _of(spans, first_trace)
    sign_span = traced["policy.sign"]
    assert sign_span.parent_span_id == caller_span
    assert sign_span.kind == SPAN_KIND_SERVER
    evaluate = traced["policy.evaluate"]
    assert evaluate.parent_span_id == sign_span.span_id
    assert evaluate.kind == SPAN_KIND_CLIENT
    worker_span = traced["filter-worker.evaluate"]
    assert worker_span.parent_span_id == evaluate.span_id
    # Resources: OTEL_SERVICE_NAME wins over Warden's name; the version and the instance.
    assert sign_span.resource["service.name"] == "edge-policy"
    assert worker_span.resource["service.name"] == "warden-filter-worker"
    for span in (sign_span, worker_span):
        assert span.resource["service.version"] == WARDEN_VERSION
        assert span.resource["service.instance.id"]
    assert all(h.get("x-collector-token") == "t0ken" for h in otlp_receiver.headers)

    # 2. No traceparent, and a caller's unsampled trace: ratio 0 records neither. A
    # third, sampled request afterwards shows the exporters had their chance.
    await sign("an untraced message")
    unsampled, unsampled_trace, _ = _traceparent(sampled=False)
    await sign("a message traced but not sampled", f"traceparent: {unsampled}")
    third, third_trace, _ = _traceparent(sampled=True)
    await sign("another traced message", f"traceparent: {third}")
    spans = otlp_receiver.wait_for(
        lambda got: {"policy.sign", "filter-worker.evaluate"} <= _of(got, third_trace).keys()
    )
    assert {s.trace_id for s in spans} == {first_trace, third_trace}
    assert not _of(spans, unsampled_trace)

    # 3. The worker's log line for the verdict names the trace and its span.
    verdict_lines = [
        line
        for line in _log_lines(worker.output())
        if line.get("message") == "verdict" and line.get("trace_id") == first_trace
    ]
    assert len(verdict_lines) == 1, worker.output()
    assert verdict_lines[0]["span_id"] == worker_span.span_id
    untraced = [
        line
        for line in _log_lines(worker.output())
        if line.get("message") == "verdict" and line.get("trace_id") != first_trace
    ]
    assert {line.get("trace_id") for line in untraced} == {third_trace, None}
    assert gateway.stop() == 0
    assert worker.stop() == 0
