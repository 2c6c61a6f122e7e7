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

# To-device moderation commands (``commands.py``, ``command_sender.py``).
MODERATION_COMMANDS = Counter(
    "warden_moderation_commands_total",
    "Redaction commands to moderation bots, by outcome: queued, duplicate (already "
    "queued), queue_full (refused: the destination holds PS_MODERATION_COMMAND_MAX_QUEUED), "
    "invalid_bot (a stored bot user ID that is not one), sent (accepted by the "
    "destination), expired (dropped unsent after PS_MODERATION_COMMAND_RETENTION_HOURS).",
    ["outcome"],
)
MODERATION_COMMAND_TRANSACTIONS = Counter(
    "warden_moderation_command_transactions_total",
    "Federation transactions of moderation commands, by outcome: ok, temporary_error "
    "(5xx, 429, network), permanent_error (other refusals); both errors are retried "
    "with backoff.",
    ["outcome"],
)
MODERATION_COMMAND_DESTINATIONS = Gauge(
    "warden_moderation_command_destinations",
    "Destinations of moderation commands by state: idle (nothing queued), pending "
    "(due to be sent), sending (claimed by a sender), backoff (waiting after a failure).",
    ["state"],
)
MODERATION_COMMANDS_QUEUED = Gauge(
    "warden_moderation_commands_queued",
    "Moderation commands queued for all destinations, not yet accepted.",
)
MODERATION_COMMAND_SEND_SECONDS = Histogram(
    "warden_moderation_command_send_seconds",
    "Time for one federation transaction of moderation commands, answered or failed.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
