"""Compiled keyword templates, kept per process and reloaded when one changes.

The admin API publishes ``{"name": ...}`` on ``KEYWORD_TEMPLATES_CHANGED_SUBJECT`` after
storing or deleting a template; every worker subscribed here reloads that template at
once (well within a second). Core NATS does not replay messages missed while
disconnected, so every template is also reloaded every ``reload_interval_seconds``.

A stored template that no longer compiles (one imported from policyserv, or written by a
newer version) is left out, logged and counted; it never fails events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from warden.bus.subjects import KEYWORD_TEMPLATES_CHANGED_SUBJECT
from warden.policy.keyword_template_language import CompiledTemplate, TemplateCompileError
from warden.storage import keyword_templates as store
from warden.storage.database import DATABASE_ERRORS

logger = logging.getLogger(__name__)

# Safety net only: edits arrive over NATS.
RELOAD_INTERVAL_SECONDS = 30.0

TEMPLATE_RELOADS = Counter(
    "warden_keyword_template_reloads_total",
    "Keyword template cache reloads, by trigger (notification, periodic, first_use).",
    ["trigger"],
)
TEMPLATE_LOAD_FAILURES = Counter(
    "warden_keyword_template_load_failures_total",
    "Stored keyword templates that did not compile when loaded (left out, never run).",
)


class KeywordTemplateCache:
    """template name → compiled template, for every enabled template in PostgreSQL."""

    def __init__(
        self, pool: asyncpg.Pool, *, reload_interval_seconds: float = RELOAD_INTERVAL_SECONDS
    ) -> None:
        self._pool = pool
        self._interval = reload_interval_seconds
        self._compiled: dict[str, CompiledTemplate] = {}
        self._loaded = False
        # Serialises reloads, so a full reload cannot undo a newer single-template one.
        self._lock = asyncio.Lock()
        self._subscription: Subscription | None = None

    async def templates(self, names: Sequence[str]) -> list[CompiledTemplate]:
        """The compiled templates among ``names`` (unknown names are skipped), in order."""
        if not self._loaded:
            await self.reload_all(trigger="first_use")
        return [t for t in (self._compiled.get(n) for n in names) if t is not None]

    def get(self, name: str) -> CompiledTemplate | None:
        """The compiled template called ``name``, if loaded."""
        return self._compiled.get(name)

    async def reload_all(self, *, trigger: str = "periodic") -> None:
        """Load and compile every enabled template (replacing the whole cache)."""
        async with self._lock:
            rows = await store.load_enabled(self._pool)
            compiled: dict[str, CompiledTemplate] = {}
            for row in rows.values():
                existing = self._compiled.get(row.name)
                if existing is not None and existing.source == row.body:
                    compiled[row.name] = existing  # unchanged: skip recompiling
                    continue
                template = _compile(row.name, row.body)
                if template is not None:
                    compiled[row.name] = template
            self._compiled = compiled
            self._loaded = True
        TEMPLATE_RELOADS.labels(trigger).inc()

    async def reload_one(self, name: str) -> None:
        """Reload one template (after a change notification); drops it when gone."""
        async with self._lock:
            rows = await store.load_enabled(self._pool, [name])
            row = rows.get(name)
            template = _compile(name, row.body) if row is not None else None
            compiled = dict(self._compiled)
            if template is None:
                compiled.pop(name, None)
            else:
                compiled[name] = template
            self._compiled = compiled
        TEMPLATE_RELOADS.labels("notification").inc()

    async def subscribe(self, nc: NATS) -> None:
        """Reload a template whenever its change is announced."""

        async def on_change(msg: Msg) -> None:
            try:
                body = orjson.loads(msg.data)
                name = body.get("name") if isinstance(body, dict) else None
            except orjson.JSONDecodeError:
                name = None
            try:
                if isinstance(name, str):
                    await self.reload_one(name)
                else:  # unreadable: reload everything, the safe choice
                    await self.reload_all(trigger="notification")
            except DATABASE_ERRORS as exc:
                # The periodic reload catches up once the database answers again.
                logger.warning("keyword template reload failed", extra={"error": repr(exc)})

        self._subscription = await nc.subscribe(KEYWORD_TEMPLATES_CHANGED_SUBJECT, cb=on_change)

    async def unsubscribe(self) -> None:
        """Stop listening for changes."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Reload every template periodically until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self._interval)
                return
            except TimeoutError:
                pass
            try:
                await self.reload_all(trigger="periodic")
            except DATABASE_ERRORS as exc:
                logger.warning("keyword template reload failed", extra={"error": repr(exc)})


def _compile(name: str, body: str) -> CompiledTemplate | None:
    try:
        return CompiledTemplate(name, body)
    except TemplateCompileError as exc:
        TEMPLATE_LOAD_FAILURES.inc()
        logger.warning(
            "stored keyword template does not compile; not run",
            extra={"template": name, "error": str(exc)},
        )
        return None
