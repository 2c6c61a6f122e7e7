"""The gateway's policy API metrics.

Labels are small fixed sets (endpoint, outcome, cache layer, failure reason); never a
room, user, server or event ID.
"""

from __future__ import annotations

import enum

from prometheus_client import Counter, Gauge

from warden.telemetry.loop_counter import LoopCounter
from warden.telemetry.loop_histogram import LoopHistogram


class Endpoint(enum.StrEnum):
    """Which policy API endpoint answered (the ``endpoint`` label)."""

    SIGN = "sign"  # /_matrix/policy/v1/sign
    SIGN_UNSTABLE = "sign_unstable"  # /_matrix/policy/unstable/org.matrix.msc4284/sign
    CHECK = "check"  # .../org.matrix.msc4284/event/{eventId}/check


class Outcome(enum.StrEnum):
    """How a policy API request ended (the ``outcome`` label)."""

    SIGNED = "signed"  # signed, or "ok" on /check
    REFUSED = "refused"  # refused, or "spam" on /check
    BAD_JSON = "bad_json"
    NOT_JSON = "not_json"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INVALID_PARAM = "invalid_param"
    OTHER_ERROR = "other_error"


class CacheLayer(enum.StrEnum):
    """Where a verdict was found (the ``layer`` label)."""

    MEMORY = "memory"
    IN_FLIGHT = "in_flight"  # joined a lookup already running in this process
    NATS = "nats"


class VerdictFailure(enum.StrEnum):
    """Why no verdict came back from the filter workers (the ``reason`` label)."""

    TIMEOUT = "timeout"
    NO_RESPONDERS = "no_responders"
    WORKER_ERROR = "worker_error"
    BAD_REPLY = "bad_reply"
    NATS_ERROR = "nats_error"
    # The worker could not judge because a dependency failed; nothing was stored.
    DEPENDENCY = "dependency"


# Counted on every /sign request: lock-free (event loop only).
SIGN_REQUESTS = LoopCounter(
    "warden_sign_requests_total",
    "Policy API requests (/sign, unstable /sign, /check), by endpoint and outcome.",
    ["endpoint", "outcome"],
)
SIGN_SECONDS = LoopHistogram(
    "warden_sign_seconds",
    "Time to answer a policy API request, by endpoint (every outcome).",
    ["endpoint"],
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
VERDICT_CACHE = LoopCounter(
    "warden_verdict_cache_total",
    "Verdicts the gateway obtained, by where they were found: the in-process cache, "
    "a lookup already in flight, or a filter worker over NATS.",
    ["layer"],
)
VERDICT_FAILURES = Counter(
    "warden_verdict_failures_total",
    "Verdict requests to the filter workers that gave no verdict, by reason.",
    ["reason"],
)
VERDICT_REASKS = Counter(
    "warden_verdict_reasks_total",
    "Verdict requests asked again because no worker answered within the claim TTL "
    "(the worker that took it may have died holding the event's claim).",
)
RATE_LIMIT_ERRORS = Counter(
    "warden_sign_rate_limit_errors_total",
    "Syncs of the policy API's per-origin rate limit that could not reach Redis (counts "
    "kept; each replica limits on its own counts until Redis answers).",
)
SEND_RATE_LIMIT_ERRORS = Counter(
    "warden_send_rate_limit_errors_total",
    "Syncs of the /send per-origin budget that could not reach Redis (counts kept; each "
    "replica limits on its own counts until Redis answers).",
)
EVENT_CHECK_CACHE = LoopCounter(
    "warden_sign_event_check_cache_total",
    "Policy API bodies whose event-level checks (content hash, event ID, sender's "
    "signature) were already done for the same bytes (hit) or had to be done (miss).",
    ["result"],
)
EVENT_CHECK_CACHE_BYTES = Gauge(
    "warden_sign_event_check_cache_bytes",
    "Approximate bytes held by the policy API's event-check cache (bounded by "
    "PS_EVENT_CHECK_CACHE_MAX_BYTES).",
)
MODERATION_REQUESTS = Counter(
    "warden_moderation_requests_total",
    "Moderation requests for refused events first asked about by their sender's server and"
    " then by another: published, failed (retried on the next such ask) or dropped (too"
    " many publishes in flight).",
    ["outcome"],
)
