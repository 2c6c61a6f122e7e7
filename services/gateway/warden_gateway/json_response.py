"""A JSON response whose body is already encoded, with its two headers built directly.

Starlette's ``Response.__init__`` renders the content and builds its headers through a
general path (header mapping, media type, charset): a few microseconds on every
``/sign`` answer, where the whole repeat costs a couple of hundred. This class sends the
same bytes and the same ``content-length`` and ``content-type`` headers.
"""

from __future__ import annotations

from starlette.responses import Response

_CONTENT_TYPE = (b"content-type", b"application/json")


class JSONBytesResponse(Response):
    """``Response(body, status_code, media_type="application/json")``, built cheaply."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200) -> None:
        # Not Response.__init__: the attributes it would set, without its general path.
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)), _CONTENT_TYPE]
