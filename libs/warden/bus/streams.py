"""JetStream streams and durable consumers, created idempotently at service start."""

from __future__ import annotations

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
    VERDICT_SUBJECTS,
    VERDICTS_STREAM,
)

# Duplicates (same Nats-Msg-Id = event ID) are dropped within this window.
DUPLICATE_WINDOW_SECONDS = 120.0
# Verdict messages are for the moderator and webhooks to act on soon; PostgreSQL keeps
# the record. A week covers any realistic outage of those consumers.
MAX_AGE_SECONDS = 7 * 24 * 3600.0
# A bound on disk use whatever the traffic: past it the oldest messages go first.
MAX_BYTES = 4 * 1024**3


async def ensure_verdicts_stream(js: JetStreamContext) -> None:
    """Create the verdicts stream if missing, or update it to the current settings."""
    config = StreamConfig(
        name=VERDICTS_STREAM,
        subjects=[VERDICT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        max_age=MAX_AGE_SECONDS,
        max_bytes=MAX_BYTES,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
    await _create_or_update(js, config)


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
