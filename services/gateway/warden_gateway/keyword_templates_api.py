"""Admin routes for keyword templates: ``/api/v1/keyword_templates/{name}``.

policyserv's paths and bodies (reference §4.3): ``POST`` takes the template text as the
raw request body and answers ``{"name", "body"}``, as ``GET`` does. Differences:

- a template is compiled when uploaded: a syntax error, or a construct the sandbox does
  not allow, is 400 ``M_BAD_JSON`` naming the line, and nothing is stored;
- a template is at most ``MAX_TEMPLATE_BYTES`` (413 ``M_TOO_LARGE`` past it);
- ``DELETE`` removes one (policyserv can only empty it);
- every change is announced on ``KEYWORD_TEMPLATES_CHANGED_SUBJECT`` once committed, so
  every worker's compiled copy is replaced within a NATS round trip.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Path
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from prometheus_client import Counter
from pydantic import BaseModel, Field
from starlette.requests import Request

from warden.bus.subjects import KEYWORD_TEMPLATES_CHANGED_SUBJECT
from warden.matrix.errors import BadJSON, NotFound, TooLarge, Unavailable
from warden.policy.keyword_template_language import (
    MAX_TEMPLATE_BYTES,
    CompiledTemplate,
    TemplateCompileError,
)
from warden.storage import keyword_templates as store
from warden.telemetry.tracing import inject_headers
from warden_gateway.admin_models import EmptyBody

logger = logging.getLogger(__name__)

# How long to wait for NATS to confirm a change notification.
NOTIFY_TIMEOUT_SECONDS = 5

TEMPLATE_NOTIFICATIONS = Counter(
    "warden_admin_keyword_template_notifications_total",
    "Keyword-template change notifications the admin API sent to workers, by outcome.",
    ["outcome"],
)

TemplateName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=255,
        pattern=r"^[^\s\x00-\x1f]+$",
        description="The template's name, as listed in keyword_template_filter_template_names",
    ),
]

_TEXT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The template text (sandboxed Jinja2), as the raw body.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


class KeywordTemplate(BaseModel):
    """A stored keyword template."""

    name: str = Field(examples=["crypto-scam"])
    body: str = Field(
        examples=[
            '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
            "org.matrix.msc4456.spam.fraud{% endif %}"
        ]
    )


def add_keyword_template_routes(router: APIRouter, *, pool: asyncpg.Pool, nats: NATS) -> None:
    """Add the keyword-template routes to the admin router (its auth and limits apply)."""

    async def notify(name: str) -> None:
        try:
            await nats.publish(
                KEYWORD_TEMPLATES_CHANGED_SUBJECT,
                orjson.dumps({"name": name}),
                headers=inject_headers() or None,
            )
            await nats.flush(timeout=NOTIFY_TIMEOUT_SECONDS)
        except (NatsError, TimeoutError) as exc:
            TEMPLATE_NOTIFICATIONS.labels("failed").inc()
            logger.warning(
                "keyword template saved but not announced",
                extra={"template": name, "error": repr(exc)},
            )
            raise Unavailable(
                "The change was saved, but the workers could not be notified; repeat the request"
            ) from None
        TEMPLATE_NOTIFICATIONS.labels("sent").inc()

    @router.get("/keyword_templates/{name}", summary="Get a keyword template")
    async def get_keyword_template(name: TemplateName) -> KeywordTemplate:
        """The stored template text."""
        row = await store.get_template(pool, name)
        if row is None:
            raise NotFound("Unknown keyword template")
        return KeywordTemplate(name=row.name, body=row.body)

    @router.post(
        "/keyword_templates/{name}",
        summary="Create or replace a keyword template",
        openapi_extra=_TEXT_BODY,
    )
    async def put_keyword_template(name: TemplateName, request: Request) -> KeywordTemplate:
        """Compile the raw body as a template and store it under ``name``."""
        raw = await request.body()
        if len(raw) > MAX_TEMPLATE_BYTES:
            raise TooLarge(f"A keyword template is at most {MAX_TEMPLATE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("The template must be UTF-8 text") from None
        try:
            CompiledTemplate(name, text)
        except TemplateCompileError as exc:
            where = f"line {exc.line}: " if exc.line is not None else ""
            raise BadJSON(f"Template does not compile: {where}{exc.message}") from None
        row = await store.put_template(pool, name, text)
        await notify(name)
        return KeywordTemplate(name=row.name, body=row.body)

    @router.delete("/keyword_templates/{name}", summary="Delete a keyword template")
    async def delete_keyword_template(name: TemplateName) -> EmptyBody:
        """Delete the template; communities naming it then skip it."""
        if not await store.delete_template(pool, name):
            raise NotFound("Unknown keyword template")
        await notify(name)
        return EmptyBody()
