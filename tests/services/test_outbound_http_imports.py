"""Outbound HTTP (media downloads, HMA, OpenAI, webhooks, homeserver APIs) does no
import work per request.

httpcore asks ``sniffio`` which async library runs on every connection-pool operation;
when sniffio is not installed, each ask is a failed import that scans ``sys.path``
(measured with ``make bench``: an eighth of the worker's CPU per scanned image).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.local_servers import start_threaded, stop_all


class _LookupCounter(importlib.abc.MetaPathFinder):
    """Counts module look-ups that reach the import system (not found in sys.modules)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        self.names.append(fullname)
        return None  # let the real finders decide


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def test_requests_through_httpx_import_nothing() -> None:
    server = await start_threaded(Starlette(routes=[Route("/ok", _ok)]))
    counter = _LookupCounter()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            assert (await client.get("/ok")).text == "ok"  # warm: first-use imports
            sys.meta_path.insert(0, counter)
            try:
                for _ in range(20):
                    assert (await client.get("/ok")).text == "ok"
            finally:
                sys.meta_path.remove(counter)
    finally:
        stop_all([server])
    assert counter.names == []
