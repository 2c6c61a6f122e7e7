"""The filter worker's Prometheus metrics (labels are bounded: outcomes, filter names,
classes; never room, user or event IDs)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from warden.policy import harms
from warden.policy.verdict import ContentClass, FilterOutcome
from warden.telemetry.loop_histogram import LoopHistogram, LoopHistogramChild

# How a request was answered.
OUTCOME_FIRST_TIME = "first_time"  # this worker evaluated the event
OUTCOME_CACHED_REDIS = "cached_redis"
OUTCOME_CACHED_DB = "cached_db"
OUTCOME_WAITED = "waited"  # another worker evaluated it; we waited for its verdict
OUTCOME_ERROR = "error"
# A dependency failed (PostgreSQL, Redis, a filter's): no verdict, judged again next time.
OUTCOME_UNAVAILABLE = "unavailable"
OUTCOMES = (
    OUTCOME_FIRST_TIME,
    OUTCOME_CACHED_REDIS,
    OUTCOME_CACHED_DB,
    OUTCOME_WAITED,
    OUTCOME_ERROR,
    OUTCOME_UNAVAILABLE,
)

EVALUATIONS = Counter(
    "warden_evaluations_total",
    "Evaluation requests answered, by how (first_time, cached_redis, cached_db, waited, error,"
    " unavailable: a dependency failed, nothing stored).",
    ["outcome"],
)
EVALUATION_SECONDS = Histogram(
    "warden_evaluation_seconds",
    "Time from receiving an evaluation request to having its answer, by outcome.",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Observed once per filter per event: the lock-free histogram of the event loop (the
# library's cost about as much as the filters together; see loop_histogram).
FILTER_SECONDS = LoopHistogram(
    "warden_filter_seconds",
    "Time one filter took on one event.",
    ["filter"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10),
)
FILTER_ERRORS = Counter(
    "warden_filter_errors_total",
    "Filter runs that raised or timed out (counted per the filter's fail_secure setting).",
    ["filter"],
)
VERDICTS = Counter(
    "warden_verdicts_total",
    "First-time verdicts, by class.",
    ["class"],
)
# Its children, bound once rather than looked up per verdict.
VERDICTS_BY_CLASS = {c: VERDICTS.labels(c.label) for c in ContentClass}
VERDICT_HARMS = Counter(
    "warden_verdict_harms_total",
    "First-time prohibited verdicts, by harm ID (one count per harm of the verdict; IDs"
    ' outside Warden\'s own set count as "unknown").',
    ["harm"],
)
# The bounded label set: every harm ID Warden declares (warden.policy.harms).
_KNOWN_HARMS = {
    value: VERDICT_HARMS.labels(value)
    for name, value in vars(harms).items()
    if name.isupper()
    and isinstance(value, str)
    and value.startswith("org.matrix.")
    and name not in ("NS", "HARMS_FIELD")
}


def count_harms(verdict_harms: tuple[str, ...]) -> None:
    """Count a first-time prohibited verdict's harms."""
    for harm in verdict_harms:
        child = _KNOWN_HARMS.get(harm)
        (child if child is not None else VERDICT_HARMS.labels("unknown")).inc()


VERDICT_BATCH_SIZE = Histogram(
    "warden_verdict_batch_size",
    "Verdicts written per PostgreSQL transaction by the group-commit writer.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
EVALUATION_BATCH_SIZE = Histogram(
    "warden_evaluation_batch_size",
    "Evaluation requests answered together as one batch (one Redis and PostgreSQL round"
    " trip per batch; PS_EVALUATION_BATCH_LINGER_MS lets batches grow under load).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
EVALUATION_QUEUE_SECONDS = Histogram(
    "warden_evaluation_queue_seconds",
    "Time an evaluation request waited in this worker between arriving and its batch"
    " starting (the batch linger, and the event loop being busy).",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
VERDICT_PUBLISH_FAILURES = Counter(
    "warden_verdict_publish_failures_total",
    "Failed attempts to publish a verdict to JetStream, by whether it was then given up.",
    ["final"],
)
VERDICT_PUBLISH_DEFERRED = Counter(
    "warden_verdict_publish_deferred_total",
    "First-time verdicts not published at once because too many publishes were pending"
    " (the outbox sweeper publishes them).",
)
# The outbox backlog as one worker's sweeper last measured it (the whole table, so every
# worker reports the same numbers: aggregate with max).
OUTBOX_UNPUBLISHED = Gauge(
    "warden_outbox_unpublished_verdicts",
    "Committed verdicts not yet acknowledged by JetStream (counted up to 100000), measured"
    " by the outbox sweeper every PS_OUTBOX_SWEEP_SECONDS.",
)
OUTBOX_OLDEST_AGE = Gauge(
    "warden_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest committed verdict not yet acknowledged by JetStream (0 when none),"
    " measured by the outbox sweeper every PS_OUTBOX_SWEEP_SECONDS.",
)
PUBLISH_PENDING = Gauge(
    "warden_verdict_publish_pending",
    "This worker's verdict publications started in the background and not yet finished"
    " (bounded; past the bound they are left to the outbox sweeper).",
)
CONFIG_INVALIDATIONS = Counter(
    "warden_config_invalidations_total",
    "Community configuration cache invalidations received.",
)


_FILTER_SECONDS: dict[str, LoopHistogramChild] = {}


def observe_outcome(outcome: FilterOutcome) -> None:
    """The pipeline's per-filter hook."""
    # Children bound once per filter name (a fixed set: the registered filters).
    child = _FILTER_SECONDS.get(outcome.name)
    if child is None:
        child = _FILTER_SECONDS[outcome.name] = FILTER_SECONDS.labels(outcome.name)
    child.observe(outcome.duration_ms / 1000)
    if outcome.error is not None:
        FILTER_ERRORS.labels(outcome.name).inc()
