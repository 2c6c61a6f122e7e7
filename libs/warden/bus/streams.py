"""JetStream streams and durable consumers, created idempotently at service start."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from warden.bus.subjects import (
    INBOUND_STREAM,
    INBOUND_SUBJECTS,
    MODERATION_REQUEST_SUBJECT,
    VERDICT_LOG_STREAM,
    VERDICT_SUBJECT_PREFIX,
    VERDICTS_STREAM,
)

if TYPE_CHECKING:
    from warden.settings import Settings

logger = logging.getLogger(__name__)

# Duplicates (same Nats-Msg-Id = event ID) are dropped within this window.
DUPLICATE_WINDOW_SECONDS = 120.0
# Verdict messages are for the moderator and webhooks to act on soon; PostgreSQL keeps
# the record. A week covers any realistic outage of those consumers.
MAX_AGE_SECONDS = 7 * 24 * 3600.0
# A bound on disk use whatever the traffic. For the stream of verdicts to act on
# (prohibited, moderation requests) nothing is evicted to stay under it: publishing fails
# instead and the verdict outbox retries until the oldest messages age out. Neutral and
# allowed verdicts, which nobody has to act on, are on a stream of their own whose
# oldest messages go first, so however many there are they take no room from refusals.
MAX_BYTES = 4 * 1024**3
LOG_MAX_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class StreamLimits:
    """What an operator owns on a stream: replicas, size and age bounds, storage.

    ``None`` means "Warden's default when the stream is created; once it exists, what
    it has". Warden owns the rest (subjects, retention, discard policy, duplicate
    window) and sets it on every start. A start therefore never scales an R3 stream
    back to R1 nor shrinks a bound someone raised with ``nats stream edit``; a value
    given here is applied to the existing stream, and the change is logged.
    """

    replicas: int | None = None
    max_bytes: int | None = None
    max_age_seconds: float | None = None
    storage: StorageType = StorageType.FILE  # only when creating: NATS cannot change it


@dataclass(frozen=True)
class StreamSettings:
    """The limits of each of Warden's streams, from the settings."""

    verdicts: StreamLimits = StreamLimits()
    verdict_log: StreamLimits = StreamLimits()
    inbound: StreamLimits = StreamLimits()

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamSettings:
        """``PS_JETSTREAM_*``: one replica count and storage for all, bounds per stream."""
        storage = StorageType(settings.jetstream_storage)

        def limits(max_bytes: int | None, max_age: float | None) -> StreamLimits:
            return StreamLimits(settings.jetstream_replicas, max_bytes, max_age, storage)

        return cls(
            verdicts=limits(
                settings.jetstream_verdicts_max_bytes,
                settings.jetstream_verdicts_max_age_seconds,
            ),
            verdict_log=limits(
                settings.jetstream_verdict_log_max_bytes,
                settings.jetstream_verdict_log_max_age_seconds,
            ),
            inbound=limits(
                settings.jetstream_inbound_max_bytes,
                settings.jetstream_inbound_max_age_seconds,
            ),
        )


@dataclass(frozen=True)
class VerdictStreams:
    """The verdict streams' names, subjects and size bounds (tests make small ones)."""

    actionable: str = VERDICTS_STREAM
    log: str = VERDICT_LOG_STREAM
    subject_prefix: str = VERDICT_SUBJECT_PREFIX
    moderation_subject: str = MODERATION_REQUEST_SUBJECT
    max_bytes: int = MAX_BYTES
    log_max_bytes: int = LOG_MAX_BYTES

    @property
    def actionable_subjects(self) -> list[str]:
        """Prohibited verdicts and moderation requests."""
        return [self.subject_prefix + "prohibited", self.moderation_subject]

    @property
    def log_subjects(self) -> list[str]:
        """Neutral and allowed verdicts."""
        return [self.subject_prefix + "neutral", self.subject_prefix + "allowed"]


async def ensure_verdicts_stream(
    js: JetStreamContext,
    streams: VerdictStreams = VerdictStreams(),
    limits: StreamSettings = StreamSettings(),
) -> None:
    """Create the verdict streams if missing, or bring what Warden owns up to date.

    Operator-owned properties (``StreamLimits``) of an existing stream are kept unless
    ``limits`` sets them.

    A deployment from before the split kept every class on one stream (``warden.verdict.*``,
    ``discard=old``): it is narrowed to what must be acted on, and the neutral and
    allowed verdicts it held (nobody consumes them) are purged from it.
    """
    actionable = StreamConfig(
        name=streams.actionable,
        subjects=streams.actionable_subjects,
        retention=RetentionPolicy.LIMITS,
        max_age=MAX_AGE_SECONDS,
        max_bytes=streams.max_bytes,
        discard=DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
    log = StreamConfig(
        name=streams.log,
        subjects=streams.log_subjects,
        retention=RetentionPolicy.LIMITS,
        max_age=MAX_AGE_SECONDS,
        max_bytes=streams.log_max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
    try:
        info = await js.stream_info(streams.actionable)
    except NotFoundError:
        await _add(js, actionable, limits.verdicts)
    else:
        old_subjects = set(info.config.subjects or ())
        if old_subjects != set(streams.actionable_subjects):
            for subject in streams.log_subjects:
                await js.purge_stream(streams.actionable, subject=subject)
        # Narrowed before the log stream is made: two streams cannot share a subject.
        await _update(js, info.config, actionable, limits.verdicts)
    await _create_or_update(js, log, limits.verdict_log)


# Inbound PDUs are work for the room-state consumer, not a record: a day covers any
# realistic outage of the filter workers, and the periodic /state refresh repairs what
# is lost beyond it. Several servers relay the same event within seconds to minutes,
# hence a longer duplicate window than the verdicts'. (Nats-Msg-Id is the event ID plus
# a digest of its signatures: see the gateway's federation_inbound.)
# When the stream is full it refuses new messages (discard=new) instead of dropping the
# oldest, which nobody may have judged yet: the gateway answers the transaction 503 and
# the origin sends it again later (warden_inbound_publish_failures_total{reason=
# "stream_full"}; see docs/runbooks.md).
INBOUND_MAX_AGE_SECONDS = 24 * 3600.0
INBOUND_DUPLICATE_WINDOW_SECONDS = 600.0
INBOUND_MAX_BYTES = 2 * 1024**3


def inbound_stream_config(
    name: str = INBOUND_STREAM,
    subjects: list[str] | None = None,
    max_bytes: int = INBOUND_MAX_BYTES,
) -> StreamConfig:
    """The inbound PDU stream's configuration (name, subjects and size for tests)."""
    return StreamConfig(
        name=name,
        subjects=subjects if subjects is not None else [INBOUND_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        max_age=INBOUND_MAX_AGE_SECONDS,
        max_bytes=max_bytes,
        discard=DiscardPolicy.NEW,
        duplicate_window=INBOUND_DUPLICATE_WINDOW_SECONDS,
    )


async def ensure_inbound_stream(
    js: JetStreamContext,
    limits: StreamSettings = StreamSettings(),
    config: StreamConfig | None = None,
) -> None:
    """Create the inbound PDU stream if missing, or bring what Warden owns up to date."""
    await _create_or_update(js, config or inbound_stream_config(), limits.inbound)


async def _create_or_update(
    js: JetStreamContext, config: StreamConfig, limits: StreamLimits
) -> None:
    """The stream ends up with Warden's part of ``config``; see ``StreamLimits``."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await _add(js, config, limits)
        return
    await _update(js, info.config, config, limits)


def _with_limits(config: StreamConfig, limits: StreamLimits) -> StreamConfig:
    """``config`` with the limits that are set (creation: Warden's defaults otherwise)."""
    changes: dict[str, object] = {}
    if limits.replicas is not None:
        changes["num_replicas"] = limits.replicas
    if limits.max_bytes is not None:
        changes["max_bytes"] = limits.max_bytes
    if limits.max_age_seconds is not None:
        changes["max_age"] = limits.max_age_seconds
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


async def _add(js: JetStreamContext, config: StreamConfig, limits: StreamLimits) -> None:
    new = dataclasses.replace(_with_limits(config, limits), storage=limits.storage)
    await js.add_stream(new)
    logger.info(
        "created JetStream stream",
        extra={
            "stream": new.name,
            "replicas": new.num_replicas or 1,
            "max_bytes": new.max_bytes,
            "max_age_seconds": new.max_age,
            "storage": str(new.storage.value if new.storage else "file"),
        },
    )


# What Warden sets on every start; everything else on an existing stream is left alone.
_WARDEN_OWNED = ("subjects", "retention", "discard", "duplicate_window")
_OPERATOR_OWNED = ("num_replicas", "max_bytes", "max_age")


async def _update(
    js: JetStreamContext, current: StreamConfig, wanted: StreamConfig, limits: StreamLimits
) -> None:
    """Set Warden's fields and the limits given; keep every other field as it is."""
    wanted = _with_limits(wanted, limits)
    given = {
        "num_replicas": limits.replicas,
        "max_bytes": limits.max_bytes,
        "max_age": limits.max_age_seconds,
    }
    changes: dict[str, object] = {f: getattr(wanted, f) for f in _WARDEN_OWNED}
    changes.update({f: v for f, v in given.items() if v is not None})
    changed = {
        f: (getattr(current, f), v) for f, v in changes.items() if _differs(getattr(current, f), v)
    }
    kept = {
        f: getattr(current, f)
        for f in _OPERATOR_OWNED
        if given[f] is None and _differs(getattr(current, f), _or_default(f, wanted))
    }
    if kept:
        logger.info(
            "JetStream stream keeps limits set outside Warden",
            extra={"stream": current.name, "kept": kept},
        )
    if not changed:
        return
    await js.update_stream(dataclasses.replace(current, **changes))  # type: ignore[arg-type]
    logger.info(
        "updated JetStream stream",
        extra={
            "stream": current.name,
            "changed": {f: {"from": _plain(a), "to": _plain(b)} for f, (a, b) in changed.items()},
        },
    )


def _or_default(field: str, config: StreamConfig) -> object:
    """A field of Warden's config; unset replicas mean the server's default, one (so an
    R1 stream is not reported as kept from an operator)."""
    value = getattr(config, field)
    return 1 if value is None and field == "num_replicas" else value


def _differs(current: object, wanted: object) -> bool:
    if isinstance(current, list) or isinstance(wanted, list):
        return bool(sorted(current or []) != sorted(wanted or []))  # type: ignore[call-overload]
    if current is None and wanted in (1, 0):  # a stream created without replicas has R1
        return False
    return bool(current != wanted)


def _plain(value: object) -> object:
    return getattr(value, "value", value)


def durable_consumer_config(
    durable: str, filter_subject: str, ack_wait: float, max_deliveries: int
) -> ConsumerConfig:
    """A pull consumer that redelivers unacknowledged messages, a bounded number of times.

    It starts at the beginning of the stream when first created: on a new deployment
    the stream is empty, and a consumer created after the stream holds verdicts acts on
    those it missed (redactions are idempotent per event ID).

    JetStream may deliver a message once more than ``max_deliveries`` (the consumer
    loop's own limit, see ``warden.bus.consumer``): that extra delivery is the one the
    loop dead-letters and counts when the earlier ones never settled. Past it JetStream
    stops delivering by itself, should even that one be lost.
    """
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=max_deliveries + 1,
    )
