"""A local HMA service and homeserver media repository, for tests and ``make bench``.

Both speak the real wire protocols Warden uses (HMA's ``POST /h/hash`` and
``GET /m/lookup``; the Client-Server API's authenticated media download), with
behaviours chosen by the media ID, so one server covers every case:

* ``img-<tag>``: a PNG whose hash HMA reports as ``<tag>``;
* ``vid-<tag>``: an MP4, served as ``image/png`` (a lying server and event);
* ``txt-<tag>``: HTML, neither image nor video;
* ``big-<tag>``: more bytes than any test's limit, streamed without a length;
* ``fat-<tag>``: the same, with its ``Content-Length``;
* ``fail-<tag>``: HTTP 500;
* ``slow-<tag>``: answers only once ``release_slow`` is set;
* ``hop-<tag>``: redirects to ``img-<tag>`` on the same server;
* ``away-<tag>``: redirects to ``redirect_target`` (another server).

HMA reports a hash's banks from its tag: ``bad...`` is in bank ``csam``, ``grey...`` in
bank ``other``, anything else in none. Both count what they were asked, per tag. HMA
answers each hash request after ``delay_seconds`` (a slow classifier, for the bench's
``text_slow_classifier`` window), and counts the requests it is holding in
``hashing``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MP4_SIGNATURE = b"\x00\x00\x00\x18ftypmp42"
_TAG = re.compile(rb"TAG:([A-Za-z0-9_-]+);")


def media_bytes(kind: str, tag: str) -> bytes:
    """The bytes the media repository serves for ``<kind>-<tag>``."""
    marker = f"TAG:{tag};".encode()
    if kind == "vid":
        return MP4_SIGNATURE + b"\x00" * 16 + marker
    if kind == "txt":
        return b"<html><body>" + marker + b"</body></html>"
    return PNG_SIGNATURE + b"\x00" * 16 + marker


@dataclass
class MediaRepository:
    """The homeserver's media repository: what it serves and what it was asked."""

    access_token: str = "media-token"  # noqa: S105  (a test fake)
    downloads: Counter[str] = field(default_factory=Counter)
    unauthorised: int = 0
    release_slow: threading.Event = field(default_factory=threading.Event)
    redirect_target: str = ""
    big_bytes: int = 4 * 1024 * 1024

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route(
                    "/_matrix/client/v1/media/download/{server}/{media_id}",
                    self._download,
                )
            ]
        )

    async def _download(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.access_token}":
            self.unauthorised += 1
            return JSONResponse({"errcode": "M_MISSING_TOKEN", "error": "no"}, status_code=401)
        media_id = request.path_params["media_id"]
        self.downloads[media_id] += 1
        kind, _, tag = media_id.partition("-")
        if kind == "fail":
            return JSONResponse({"errcode": "M_UNKNOWN", "error": "broken"}, status_code=500)
        if kind == "slow":
            await asyncio.get_running_loop().run_in_executor(None, self.release_slow.wait, 30)
            kind = "img"
        if kind == "hop":
            server = request.path_params["server"]
            return Response(
                status_code=302,
                headers={"location": f"/_matrix/client/v1/media/download/{server}/img-{tag}"},
            )
        if kind == "away":
            return Response(status_code=302, headers={"location": self.redirect_target})
        if kind == "big":
            size = self.big_bytes

            async def chunks() -> AsyncIterator[bytes]:
                sent = 0
                yield PNG_SIGNATURE
                while sent < size:
                    yield b"\x00" * 65536
                    sent += 65536

            return StreamingResponse(chunks(), media_type="image/png")
        if kind == "fat":
            return Response(PNG_SIGNATURE + b"\x00" * self.big_bytes, media_type="image/png")
        return Response(media_bytes(kind, tag), media_type="image/png")


@dataclass
class HmaService:
    """The HMA service: hashes by tag, banks by tag prefix."""

    api_key: str = "hma-key"
    hashed: Counter[str] = field(default_factory=Counter)  # tag → /h/hash calls
    kinds: Counter[str] = field(default_factory=Counter)  # "photo"/"video" → calls
    lookups: Counter[str] = field(default_factory=Counter)  # signal type → calls
    unauthorised: int = 0
    fail: bool = False
    delay_seconds: float = 0.0  # before answering a hash request (a slow classifier)
    hashing: int = 0  # hash requests being answered now

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/h/hash", self._hash, methods=["POST"]),
                Route("/m/lookup", self._lookup, methods=["GET"]),
            ]
        )

    def _authorised(self, request: Request) -> bool:
        if request.headers.get("authorization") == f"Bearer {self.api_key}":
            return True
        self.unauthorised += 1
        return False

    async def _hash(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"detail": "unauthorised"}, status_code=401)
        if self.fail:
            return JSONResponse({"detail": "down"}, status_code=503)
        self.hashing += 1
        try:
            if self.delay_seconds > 0:
                await asyncio.sleep(self.delay_seconds)
            return await self._hash_form(request)
        finally:
            self.hashing -= 1

    async def _hash_form(self, request: Request) -> Response:
        form = await request.form()
        for kind in ("photo", "video"):
            upload = form.get(kind)
            if upload is None or isinstance(upload, str):
                continue
            data = await upload.read()
            match = _TAG.search(data)
            tag = match.group(1).decode() if match else "untagged"
            self.hashed[tag] += 1
            self.kinds[kind] += 1
            if kind == "video":
                return JSONResponse({"md5": f"md5-{tag}"})
            return JSONResponse({"pdq": f"pdq-{tag}"})
        return JSONResponse({"detail": "no media field"}, status_code=422)

    async def _lookup(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"detail": "unauthorised"}, status_code=401)
        signal_type = request.query_params.get("signal_type", "")
        signal = request.query_params.get("signal", "")
        self.lookups[signal_type] += 1
        tag = signal.partition("-")[2]
        if tag.startswith("bad"):
            return JSONResponse({"csam": [{"bank_content_id": 1, "distance": "0"}]})
        if tag.startswith("grey"):
            return JSONResponse({"other": [{"bank_content_id": 2, "distance": "3"}]})
        return JSONResponse({})
