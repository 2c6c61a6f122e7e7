"""The moderator's Prometheus metrics (labels are bounded: no room, user or event IDs)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODERATION_ACTIONS = Counter(
    "warden_moderation_actions_total",
    "Moderation decisions on prohibited verdicts, by action and outcome (ok, "
    "skipped_own_server, no_moderator, moderator_not_configured, already_done, retry, "
    "failed, invalid).",
    ["action", "outcome"],
)
MODERATION_SECONDS = Histogram(
    "warden_moderation_seconds",
    "Time spent handling one verdict message, including the Client-Server API call.",
    ["action"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MODERATOR_CLIENTS = Gauge(
    "warden_moderator_clients",
    "Configured moderator access tokens by state (resolved, pending, invalid).",
    ["state"],
)
