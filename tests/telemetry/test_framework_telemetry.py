"""FastAPI's own OpenTelemetry instrumentation makes a server span per request only when
Warden exports spans: it turns itself on whenever a tracer provider is installed (every
Warden process installs one), and its spans cost the gateway CPU for nobody."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from warden_gateway.app import build_admin_app


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/_test/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    return router


async def _ask(exporting: bool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # the installed provider
    monkeypatch.setattr("warden.telemetry.tracing._exporting", exporting)
    app = build_admin_app(_router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/_test/ping")
    assert r.json() == {"ok": "yes"}
    return [span.name for span in exporter.get_finished_spans()]


async def test_no_framework_spans_when_not_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert await _ask(False, monkeypatch) == []


async def test_framework_server_span_when_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    names = await _ask(True, monkeypatch)
    assert any("/_test/ping" in name for name in names), names
