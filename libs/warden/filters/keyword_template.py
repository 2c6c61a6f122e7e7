"""Keyword-template filter: runs the community's named templates over a message.

Each template (``warden.policy.keyword_template_language``, stored through the admin API
and compiled by ``FilterDeps.keyword_templates``) sees ``BodyRaw`` (``body`` + " " +
``formatted_body``, or the whole event's JSON with
``keyword_template_filter_use_full_event``) and ``BodyWords`` (``BodyRaw`` split on
whitespace), and outputs whitespace-separated harm IDs. Unlike policyserv, IDs that are
not known harms are dropped (logged and counted) instead of being passed on. Only
``m.room.message`` events are checked, as policyserv.

A template that fails or exceeds its bounds raises: the pipeline counts it as a filter
error (``keyword_template_fail_secure``).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import KNOWN_HARMS
from warden.policy.keyword_template_language import (
    TemplateLimitExceeded,
    TemplateRenderError,
    body_inputs,
)

logger = logging.getLogger(__name__)

TEMPLATE_NAMES, USE_FULL_EVENT = declare(
    ConfigKey(
        "keyword_template_filter_template_names",
        "list[str]",
        [],
        "Names of keyword templates (/api/v1/keyword_templates) run over each message. "
        "Empty disables.",
    ),
    ConfigKey(
        "keyword_template_filter_use_full_event",
        "bool",
        False,
        "Give templates the whole event's JSON as BodyRaw instead of body + formatted_body.",
    ),
)

TEMPLATE_RENDER_FAILURES = Counter(
    "warden_keyword_template_render_failures_total",
    "Keyword template renders that failed, by reason (limit: a time, size or iteration "
    "bound was exceeded; error: the template raised).",
    ["reason"],
)
TEMPLATE_UNKNOWN_HARMS = Counter(
    "warden_keyword_template_unknown_harms_total",
    "Words output by keyword templates that are not known harm IDs (dropped).",
)
TEMPLATES_MISSING = Counter(
    "warden_keyword_template_missing_total",
    "Keyword templates a community names that are not stored (or do not compile).",
)


class KeywordTemplateFilter(Filter):
    """Prohibits messages for which a template outputs known harm IDs."""

    name = "keyword_template"
    checks_text = True
    group = Group.MAIN
    harm_ids = tuple(sorted(KNOWN_HARMS))

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the community names at least one template."""
        return any(config.get_list(TEMPLATE_NAMES.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited with the union of the harms the templates output."""
        if ctx.event_type != "m.room.message":
            return FilterResult.neutral()
        names = [n for n in ctx.config.get_list(TEMPLATE_NAMES.name) if n]
        templates = await ctx.deps.keyword_templates.templates(names)
        if len(templates) < len(names):
            TEMPLATES_MISSING.inc(len(names) - len(templates))
        if not templates:
            return FilterResult.neutral()
        if ctx.config.get_bool(USE_FULL_EVENT.name):
            raw = ctx.event_json
        else:
            raw = ctx.string_field("body") + " " + ctx.string_field("formatted_body")
        body_raw, body_words = body_inputs(raw)
        harms: dict[str, None] = {}  # ordered set
        for template in templates:
            try:
                output = template.render_text(body_raw, body_words)
            except TemplateRenderError as exc:
                reason = "limit" if isinstance(exc, TemplateLimitExceeded) else "error"
                TEMPLATE_RENDER_FAILURES.labels(reason).inc()
                raise TemplateRenderError(f"template {template.name!r}: {exc}") from None
            for word in output.split():
                if word in KNOWN_HARMS:
                    harms[word] = None
                else:
                    TEMPLATE_UNKNOWN_HARMS.inc()
                    logger.warning(
                        "keyword template output an unknown harm ID; dropped",
                        extra={"template": template.name, "harm": word[:100]},
                    )
        if harms:
            return FilterResult.prohibited(*harms)
        return FilterResult.neutral()
