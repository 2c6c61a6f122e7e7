"""Matrix errors: each class carries its ``errcode`` and HTTP status.

A small taxonomy in the manner of sygnal and mautrix: handlers raise these and one
exception handler turns them into ``{"errcode", "error"}`` bodies, so a client's bad
input never becomes a 500.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MatrixError(Exception):
    """An error that is sent to the client as a Matrix error body."""

    errcode: ClassVar[str] = "M_UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The JSON body for this error."""
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.error}
        body.update(self.extra)
        return body


_BY_ERRCODE: dict[str, type[MatrixError]] = {}


def _register(cls: type[MatrixError]) -> type[MatrixError]:
    _BY_ERRCODE[cls.errcode] = cls
    return cls


def error_class_for(errcode: str) -> type[MatrixError]:
    """Look up the error class registered for an errcode (``MatrixError`` if none)."""
    return _BY_ERRCODE.get(errcode, MatrixError)


@_register
class Forbidden(MatrixError):
    errcode = "M_FORBIDDEN"
    status = 403


@_register
class Unauthorized(MatrixError):
    errcode = "M_UNAUTHORIZED"
    status = 401


@_register
class NotJSON(MatrixError):
    errcode = "M_NOT_JSON"
    status = 400


@_register
class BadJSON(MatrixError):
    errcode = "M_BAD_JSON"
    status = 400


@_register
class NotFound(MatrixError):
    errcode = "M_NOT_FOUND"
    status = 404


@_register
class TooLarge(MatrixError):
    errcode = "M_TOO_LARGE"
    status = 413


@_register
class LimitExceeded(MatrixError):
    errcode = "M_LIMIT_EXCEEDED"
    status = 429


@_register
class Unrecognized(MatrixError):
    errcode = "M_UNRECOGNIZED"
    status = 405


@_register
class InvalidParam(MatrixError):
    errcode = "M_INVALID_PARAM"
    status = 400


@_register
class UnsupportedRoomVersion(MatrixError):
    errcode = "M_UNSUPPORTED_ROOM_VERSION"
    status = 400


class Unavailable(MatrixError):
    """A temporary failure on our side (a dependency is down); the client may retry."""

    errcode = "M_UNKNOWN"
    status = 503


@_register
class MissingToken(MatrixError):
    """No access token was given (server-centric API)."""

    errcode = "M_MISSING_TOKEN"
    status = 401


@_register
class UnknownToken(MatrixError):
    """The access token is not one Warden issued, or was rotated away."""

    errcode = "M_UNKNOWN_TOKEN"
    status = 401


@_register
class BadState(MatrixError):
    """The request is valid but the resource's state forbids it (policyserv's code)."""

    errcode = "M_BAD_STATE"
    status = 400
