"""The webhooks service's Prometheus metrics (bounded labels; no IDs, no URLs)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOK_DELIVERIES = Counter(
    "warden_webhook_deliveries_total",
    "Audit webhook decisions on prohibited verdicts, by outcome (delivered, failed, retry, "
    "skipped_not_allowed, skipped_no_url, already_done, duplicate, invalid).",
    ["outcome"],
)
WEBHOOK_SECONDS = Histogram(
    "warden_webhook_seconds",
    "Time spent handling one verdict message, including the webhook POST.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
