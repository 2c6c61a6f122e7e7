"""Prometheus metrics shared by every service.

Naming: ``warden_`` prefix, counters end in ``_total``, durations are ``_seconds``
histograms. Labels are always bounded (route templates, status codes, service names),
never room IDs, user IDs or event IDs.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from warden.telemetry.loop_counter import LoopCounter
from warden.telemetry.loop_histogram import LoopHistogram

try:
    WARDEN_VERSION = version("warden")
except PackageNotFoundError:  # running from a source tree without an install
    WARDEN_VERSION = "0+unknown"

# No ``_created`` series: a sample per counter and histogram child that dashboards never
# use (58 of the gateway's 324 samples at idle). It is read when scraped, so this covers
# metrics defined in any module.
disable_created_metrics()  # type: ignore[no-untyped-call]

BUILD_INFO = Gauge("warden_build_info", "Warden's version; always 1.", ["service", "version"])
READY = Gauge("warden_ready", "1 while the service reports ready, 0 otherwise.", ["service"])

# Counted on every request of every service: lock-free (event loop only).
HTTP_REQUESTS = LoopCounter(
    "warden_http_requests_total",
    "HTTP requests answered, by route template and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = LoopHistogram(
    "warden_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["route", "method"],
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DEPENDENCY_UP = Gauge(
    "warden_dependency_up",
    "1 when the last readiness check of a dependency passed.",
    ["service", "dependency"],
)

KEY_FETCHES = Counter(
    "warden_key_fetches_total",
    "Fetches of other servers' keys, by source (direct or notary) and outcome.",
    ["source", "outcome"],
)
COMPROMISED_KEYS_SEEN = Counter(
    "warden_compromised_keys_seen_total",
    "Keys of fetched server key documents that are the publicly known compromised key "
    "(dropped, and marked for the unsafe signing key filter).",
)
KEY_FETCHES_REFUSED = Counter(
    "warden_key_fetches_refused_total",
    "Key fetches not started because a bound was reached: client_budget "
    "(PS_KEY_FETCHES_PER_CLIENT_PER_MINUTE) or busy (PS_KEY_FETCH_CONCURRENCY).",
    ["reason"],
)


def render_latest() -> tuple[bytes, str]:
    """The exposition text of the default registry and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


SRV_TARGETS_CAPPED = Counter(
    "warden_srv_targets_capped_total",
    "Server name resolutions whose SRV answer listed more targets than are tried "
    "(the rest are ignored).",
)


ROOM_STATE_CAP_HITS = Counter(
    "warden_room_state_cap_hits_total",
    "Learned room state entries not kept because a per-room cap was reached, by kind "
    "(member, displayname, policy_rule; PS_ROOM_STATE_MAX_*).",
    ["kind"],
)
