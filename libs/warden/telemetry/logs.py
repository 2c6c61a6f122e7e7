"""JSON logs on stdout, one line per event.

Every line carries ``ts``, ``level``, ``logger``, ``service`` and ``message``, plus any
``extra={...}`` fields, and ``trace_id``/``span_id`` (hex, as trace backends show them)
while a sampled span is current, so that a line leads to its trace. Message content
(event bodies) is only logged when ``PS_LOG_CONTENT`` is on and the level is DEBUG; call
sites check ``content_logging()``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from opentelemetry.trace import get_current_span
from pythonjsonlogger.json import JsonFormatter

_content_logging = False


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        # uvicorn adds a copy of its message with terminal colour codes.
        record.__dict__.pop("color_message", None)
        # Only a sampled trace can be looked up; an unsampled one's IDs would lead nowhere.
        span_context = get_current_span().get_span_context()
        if span_context.trace_flags.sampled:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        return True


def configure_logging(service: str, level: str = "INFO", *, log_content: bool = False) -> None:
    """Send all logging to stdout as JSON lines tagged with the service name."""
    global _content_logging
    _content_logging = log_content and level == "DEBUG"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="ts",  # ISO 8601 in UTC
        )
    )
    handler.addFilter(_ServiceFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would be a second, unstructured line per request.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Our runtime logs its own "listening" line; uvicorn's start-up chatter is noise.
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def content_logging() -> bool:
    """Whether event content may be written to logs (debug level and PS_LOG_CONTENT)."""
    return _content_logging


def redact_content(value: Any) -> Any:
    """``value`` when content logging is on, else a placeholder."""
    return value if _content_logging else "<redacted>"
