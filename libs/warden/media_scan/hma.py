"""A client of Meta's Hasher-Matcher-Actioner (HMA) API: hash media, look hashes up.

``POST {PS_HMA_API_URL}/h/hash`` (multipart, the media in field ``photo`` or ``video``)
answers ``{<signal type>: <hash>}``; ``GET {url}/m/lookup?signal_type=&signal=`` answers
``{<bank name>: [<match>, ...]}``. Both with ``Authorization: Bearer PS_HMA_API_KEY``.
The lookups of one piece of media run concurrently. Any failure is a
``DependencyUnavailable`` (the scan is tried again on the next ask).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import httpx
import orjson

from warden.outbound_http import USER_AGENT, read_capped
from warden.policy.dependency_failures import DependencyUnavailable

MediaKind = Literal["photo", "video"]
# Answers are small JSON objects; a larger one is not read.
_MAX_ANSWER_BYTES = 1024 * 1024
_MAX_SIGNAL_TYPES = 16


class HmaUnavailable(DependencyUnavailable):
    """HMA failed, answered an error or something that is not its API's answer."""


class HmaClient:
    """Talks to one HMA instance; one per process."""

    def __init__(self, base_url: str, api_key: str, *, timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def hash(self, data: bytes, kind: MediaKind, content_type: str) -> dict[str, str]:
        """The media's hashes by signal type (e.g. ``{"pdq": "..."}``)."""
        answer = await self._call("POST", "/h/hash", files={kind: ("media", data, content_type)})
        if not isinstance(answer, dict) or len(answer) > _MAX_SIGNAL_TYPES:
            raise HmaUnavailable("HMA /h/hash answered something that is not hashes")
        return {k: v for k, v in answer.items() if isinstance(k, str) and isinstance(v, str) and v}

    async def banks_matching(self, hashes: dict[str, str]) -> list[str]:
        """The names of the banks any of ``hashes`` matched, sorted."""
        answers = await asyncio.gather(
            *(
                self._call("GET", "/m/lookup", params={"signal_type": t, "signal": h})
                for t, h in hashes.items()
            )
        )
        banks: set[str] = set()
        for answer in answers:
            if not isinstance(answer, dict):
                raise HmaUnavailable("HMA /m/lookup answered something that is not banks")
            banks.update(name for name, matches in answer.items() if matches)
        return sorted(banks)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._client.stream(method, self.base_url + path, **kwargs) as response:
                body = await read_capped(response, _MAX_ANSWER_BYTES + 1)
                status = response.status_code
        except httpx.HTTPError as exc:
            raise HmaUnavailable(f"HMA {path}: {type(exc).__name__}") from exc
        if status != 200:
            raise HmaUnavailable(f"HMA {path} answered HTTP {status}")
        if len(body) > _MAX_ANSWER_BYTES:
            raise HmaUnavailable(f"HMA {path} answered more than {_MAX_ANSWER_BYTES} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HmaUnavailable(f"HMA {path} answered invalid JSON") from exc
