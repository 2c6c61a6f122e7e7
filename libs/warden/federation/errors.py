"""Failures of outbound federation requests.

Two branches, in the manner of sygnal: a ``TemporaryFederationError`` may succeed if
tried again later (timeouts, refused connections, DNS failures, 5xx, 429), a
``PermanentFederationError`` will not (other 4xx, garbage responses, TLS verification
failures, destinations the network guard refuses). Callers that back off per
destination only need to tell the two apart; the concrete classes are for logs,
metrics and tests. Every message names the destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FederationError(Exception):
    """A request to another server failed."""

    def __init__(self, destination: str, message: str) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination
        self.reason = message


class TemporaryFederationError(FederationError):
    """A failure that may go away: worth retrying later."""


class PermanentFederationError(FederationError):
    """A failure that retrying will not fix."""


class InvalidDestination(PermanentFederationError):
    """The destination is not a valid server name."""


class DeniedDestination(PermanentFederationError):
    """The network guard refused every address the destination resolved to."""

    def __init__(self, destination: str, address: str, message: str | None = None) -> None:
        super().__init__(
            destination,
            message or f"address {address} is not an allowed federation destination",
        )
        self.address = address


class ResolutionError(TemporaryFederationError):
    """DNS gave no usable address for the destination."""


class FederationConnectError(TemporaryFederationError):
    """No connection could be made (refused, reset, unreachable)."""


class FederationTimeout(TemporaryFederationError):
    """The request did not complete within its time limit."""


class TLSVerificationError(PermanentFederationError):
    """The destination's TLS certificate could not be verified."""


class InvalidResponse(PermanentFederationError):
    """The response was not what the API promises (not JSON, not an object)."""


class ResponseTooLarge(PermanentFederationError):
    """The response body was larger than the client accepts."""

    def __init__(self, destination: str, limit: int) -> None:
        super().__init__(destination, f"response body exceeds {limit} bytes")
        self.limit = limit


class HttpResponseError(FederationError):
    """The destination answered with a non-2xx status.

    ``errcode`` and ``error`` are set when the body was a Matrix error object, and
    ``body`` holds that whole object (its extra fields, e.g. ``room_version``). Use
    ``HttpResponseError.create`` so that the instance is also Temporary (5xx, 429) or
    Permanent (everything else).
    """

    def __init__(
        self,
        destination: str,
        status: int,
        *,
        errcode: str | None = None,
        error: str | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        detail = f"HTTP {status}"
        if errcode:
            detail += f" {errcode}"
        if error:
            detail += f": {error}"
        super().__init__(destination, detail)
        self.status = status
        self.errcode = errcode
        self.error = error
        self.body: Mapping[str, Any] = body or {}

    @staticmethod
    def create(
        destination: str,
        status: int,
        *,
        errcode: str | None = None,
        error: str | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> HttpResponseError:
        """Build the Temporary or Permanent variant that fits ``status``."""
        cls: type[HttpResponseError]
        if status >= 500 or status == 429:
            cls = TemporaryHttpResponseError
        else:
            cls = PermanentHttpResponseError
        return cls(destination, status, errcode=errcode, error=error, body=body)


class TemporaryHttpResponseError(HttpResponseError, TemporaryFederationError):
    """A 5xx or 429 answer."""


class PermanentHttpResponseError(HttpResponseError, PermanentFederationError):
    """A 3xx or 4xx (other than 429) answer."""
