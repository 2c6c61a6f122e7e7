"""JetStream streams and durable consumers, created idempotently at service start."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
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
    js: JetStreamContext, streams: VerdictStreams = VerdictStreams()
) -> None:
    """Create the verdict streams if missing, or update them to the current settings.

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
        await js.add_stream(actionable)
    else:
        old_subjects = set(info.config.subjects or ())
        if old_subjects != set(streams.actionable_subjects):
            for subject in streams.log_subjects:
                await js.purge_stream(streams.actionable, subject=subject)
        # Narrowed before the log stream is made: two streams cannot share a subject.
        await js.update_stream(actionable)
    await _create_or_update(js, log)


# Inbound PDUs are work for the room-state consumer, not a record: a day covers any
# realistic outage of the filter workers, and the periodic /state refresh repairs what
# is lost beyond it. Several servers relay the same event within seconds to minutes,
# hence a longer duplicate window than the verdicts'. (Nats-Msg-Id is the event ID plus
# a digest of its signatures: see the gateway's federation_inbound.)
# When the stream is full it refuses new messages (discard=new) instead of dropping the
# oldest, which nobody may have judged yet: the gateway answers the transaction 503 and
# the origin sends it again later (warden_inbound_publish_failures_total{reason=
# "stream_full"}; see the README's alerts).
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


async def ensure_inbound_stream(js: JetStreamContext) -> None:
    """Create the inbound PDU stream if missing, or update it to the current settings."""
    await _create_or_update(js, inbound_stream_config())


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    """Declarative: the stream ends up with ``config`` whether it existed or not."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


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
