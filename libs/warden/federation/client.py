"""The outbound federation HTTP client.

``FederationClient`` sends JSON requests to other Matrix servers: it resolves the
destination (``resolver.py``), connects only to addresses the network guard allows
(``network_guard.py``), verifies TLS against the destination's name, signs requests
with X-Matrix when asked, caps the response size while reading, and turns every
failure into one of the errors in ``errors.py``.

The keyring uses it unsigned for ``GET /_matrix/key/v2/server`` and signed for
``POST /_matrix/key/v2/query`` at the notary.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import dns.asyncresolver
import httpx
import orjson

from warden.federation.errors import (
    FederationTimeout,
    HttpResponseError,
    InvalidDestination,
    InvalidResponse,
    ResponseTooLarge,
)
from warden.federation.network_guard import (
    GuardedTransport,
    NetworkGuard,
    map_httpx_error,
    send_to_targets,
)
from warden.federation.resolver import ServerNameResolver, parse_server_name
from warden.federation.xmatrix import sign_request
from warden.matrix.ids import ServerName
from warden.matrix.keys import SigningKey
from warden.settings import Settings

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
QueryParams = Mapping[str, str | Sequence[str]]

DEFAULT_MAX_RESPONSE_SIZE = 16 * 1024 * 1024
# Error bodies are read only to find errcode/error; no need for megabytes.
_MAX_ERROR_BODY = 64 * 1024
USER_AGENT = "Warden/0.1 (Matrix policy server)"


def build_ssl_context(*, verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """TLS settings for outbound federation.

    The system trust store plus ``ca_file`` when given. ``verify=False`` turns all
    verification off: for development only.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def encode_query(query: QueryParams | None) -> str:
    """Percent-encode query parameters (``a=1&b=x&b=y``); empty string for none."""
    if not query:
        return ""
    pairs: list[tuple[str, str]] = []
    for name, value in query.items():
        if isinstance(value, str):
            pairs.append((name, value))
        else:
            pairs.extend((name, item) for item in value)
    return urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote, safe="")


class FederationClient:
    """Sends JSON requests to other servers over federation.

    One pooled ``httpx.AsyncClient`` serves every destination; connections are kept per
    TLS identity by ``GuardedTransport``. ``resolver`` and ``guard`` default to ones
    built from ``settings``; ``dns_resolver`` overrides the system DNS configuration
    of the default resolver; ``ca_file`` overrides ``PS_FEDERATION_CA_FILE``.
    """

    def __init__(
        self,
        settings: Settings,
        signing_key: SigningKey,
        *,
        resolver: ServerNameResolver | None = None,
        guard: NetworkGuard | None = None,
        ca_file: str | None = None,
        dns_resolver: dns.asyncresolver.Resolver | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        limits: httpx.Limits | None = None,
    ) -> None:
        self.settings = settings
        self.origin: ServerName = settings.server_name
        self.signing_key = signing_key
        self.max_response_size = max_response_size
        self.default_timeout = settings.federation_timeout_seconds
        self.guard = guard or NetworkGuard.from_settings(settings)
        ssl_context = build_ssl_context(
            verify=settings.federation_verify_tls,
            ca_file=ca_file or settings.federation_ca_file,
        )
        self.transport = GuardedTransport(self.guard, ssl_context, limits=limits)
        # trust_env=False: an HTTP(S)_PROXY from the environment would connect for us,
        # to addresses the guard never saw.
        self.http = httpx.AsyncClient(
            transport=self.transport,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(self.default_timeout),
            headers={"User-Agent": USER_AGENT},
        )
        self._owns_resolver = resolver is None
        self.resolver = resolver or ServerNameResolver(
            self.guard, http=self.http, dns_resolver=dns_resolver
        )

    async def aclose(self) -> None:
        """Close pooled connections (and the resolver, if this client made it)."""
        await self.http.aclose()
        if self._owns_resolver:
            await self.resolver.aclose()

    async def __aenter__(self) -> FederationClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def get_json(
        self,
        destination: str,
        path: str,
        *,
        query: QueryParams | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - the budget covers resolution too
        max_response_size: int | None = None,
    ) -> JsonDict:
        """``GET`` a JSON object from ``destination``; see ``request_json``."""
        return await self.request_json(
            "GET",
            destination,
            path,
            query=query,
            signed=signed,
            timeout=timeout,
            max_response_size=max_response_size,
        )

    async def post_json(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        query: QueryParams | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> JsonDict:
        """``POST`` a JSON object and return the JSON object answered."""
        return await self.request_json(
            "POST", destination, path, query=query, body=body, signed=signed, timeout=timeout
        )

    async def put_json(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        query: QueryParams | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> JsonDict:
        """``PUT`` a JSON object and return the JSON object answered."""
        return await self.request_json(
            "PUT", destination, path, query=query, body=body, signed=signed, timeout=timeout
        )

    async def request_json(
        self,
        method: str,
        destination: str,
        path: str,
        *,
        query: QueryParams | None = None,
        body: Mapping[str, Any] | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
        max_response_size: int | None = None,
    ) -> JsonDict:
        """Send one request and return the JSON object of a 2xx answer.

        ``path`` must already be percent-encoded (``ValueError`` otherwise); ``query``
        values are encoded here. ``timeout`` (default ``PS_FEDERATION_TIMEOUT_SECONDS``)
        bounds the whole request: resolution, connecting, sending and reading. Signed
        requests carry X-Matrix for exactly the path and query sent.

        Raises a ``TemporaryFederationError`` or ``PermanentFederationError``; non-2xx
        answers are ``HttpResponseError`` subclasses carrying status and errcode.
        ``max_response_size`` lowers the client's body cap for this request (for callers
        that expect a small answer, such as one event).
        """
        document = await self._request_document(
            method,
            destination,
            path,
            query=query,
            body=body,
            signed=signed,
            timeout=timeout,
            max_response_size=max_response_size,
        )
        if not isinstance(document, dict):
            raise InvalidResponse(destination, "response is not a JSON object")
        return document

    async def put_json_legacy_pair(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> JsonDict:
        """``PUT`` to a v1 endpoint that answers ``[200, {...}]`` and return the object.

        The v1 ``send_join``, ``send_leave`` and ``invite`` endpoints answer that way, a
        historical quirk the spec keeps. Anything else is ``InvalidResponse``.
        """
        document = await self._request_document(
            "PUT", destination, path, body=body, signed=True, timeout=timeout
        )
        if (
            not isinstance(document, list)
            or len(document) != 2
            or not isinstance(document[1], dict)
        ):
            raise InvalidResponse(destination, "response is not a [status, object] pair")
        result: JsonDict = document[1]
        return result

    async def _request_document(
        self,
        method: str,
        destination: str,
        path: str,
        *,
        query: QueryParams | None = None,
        body: Mapping[str, Any] | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
        max_response_size: int | None = None,
    ) -> Any:
        """Send one request and return the parsed JSON of a 2xx answer, whatever its type."""
        if not path.startswith("/") or "?" in path or "#" in path:
            raise ValueError(f"path must be an absolute path without query: {path!r}")
        try:
            parse_server_name(destination)
        except ValueError as exc:
            raise InvalidDestination(destination, str(exc)) from None
        encoded_query = encode_query(query)
        target = f"{path}?{encoded_query}" if encoded_query else path
        content = orjson.dumps(body) if body is not None else None

        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        if signed:
            headers["Authorization"] = sign_request(
                self.origin, destination, method, target, body, self.signing_key
            )

        budget = self.default_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(budget):
                return await self._send(
                    method,
                    destination,
                    target,
                    headers,
                    content,
                    budget,
                    self.max_response_size if max_response_size is None else max_response_size,
                )
        except TimeoutError:
            raise FederationTimeout(
                destination, f"{method} {path} took longer than {budget:g}s"
            ) from None

    async def _send(
        self,
        method: str,
        destination: str,
        target: str,
        headers: dict[str, str],
        content: bytes | None,
        budget: float,
        max_response_size: int,
    ) -> Any:
        try:
            resolved = await self.resolver.resolve(destination)
        except ValueError as exc:
            raise InvalidDestination(destination, str(exc)) from None
        response = await send_to_targets(
            self.http,
            self.guard,
            destination=destination,
            method=method,
            targets=resolved.targets,
            host_header=resolved.host_header,
            tls_server_name=resolved.tls_server_name,
            target=target,
            headers=headers,
            content=content,
            # Connect attempts get a shorter limit so one dead address leaves time for
            # the next candidate.
            http_timeout=httpx.Timeout(budget, connect=min(budget, 10.0)),
        )
        try:
            if not 200 <= response.status_code < 300:
                raise await self._error_for(destination, response)
            raw = await self._read_limited(destination, response, max_response_size)
        finally:
            await response.aclose()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidResponse(destination, f"response is not valid JSON: {exc}") from None

    async def _read_limited(self, destination: str, response: httpx.Response, limit: int) -> bytes:
        """Read the (decoded) body, refusing it once it passes ``limit`` bytes."""
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ResponseTooLarge(destination, limit)
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ResponseTooLarge(destination, limit)
        except httpx.HTTPError as exc:
            raise map_httpx_error(destination, exc) from exc
        return bytes(body)

    async def _error_for(self, destination: str, response: httpx.Response) -> HttpResponseError:
        """The error for a non-2xx answer, with errcode/error when the body has them."""
        errcode: str | None = None
        error: str | None = None
        try:
            raw = await self._read_limited(destination, response, _MAX_ERROR_BODY)
            document = orjson.loads(raw)
        except Exception:  # any body problem: the status alone still says what happened
            document = None
        if isinstance(document, dict):
            if isinstance(document.get("errcode"), str):
                errcode = document["errcode"]
            if isinstance(document.get("error"), str):
                error = document["error"][:500]
        return HttpResponseError.create(
            destination,
            response.status_code,
            errcode=errcode,
            error=error,
            body=document if isinstance(document, dict) and errcode else None,
        )
