"""The ``moderation_bot_user_id`` community key (reference §2.3, to-device commands).

When set, every prohibited verdict of the community is also sent to that bot as a
signed ``org.matrix.policyserv.command`` to-device message over federation (the
moderator's command path, ``warden_moderator.commands``), whether or not the room has
a Client-Server API moderator too.
"""

from __future__ import annotations

from typing import Any

from warden.federation.xmatrix import is_valid_server_name
from warden.policy.config import ConfigError, ConfigKey, declare

KEY = "moderation_bot_user_id"
# The spec's limit for user IDs (255 bytes including the sigil and server name).
MAX_USER_ID_BYTES = 255


def validate_user_id(value: Any) -> str:
    """An empty string (off) or a user ID ``@localpart:server``; raises ``ConfigError``."""
    text = str(value).strip()
    if not text:
        return ""
    if len(text.encode("utf-8")) > MAX_USER_ID_BYTES:
        raise ConfigError(KEY, f"a user ID is at most {MAX_USER_ID_BYTES} bytes")
    localpart, sep, server = text[1:].partition(":")
    if not text.startswith("@") or not sep or not localpart:
        raise ConfigError(KEY, f"{text!r} is not a user ID (@localpart:server.name)")
    if not is_valid_server_name(server):
        raise ConfigError(KEY, f"{server!r} is not a valid server name")
    if any(c.isspace() or ord(c) < 0x20 for c in localpart):
        raise ConfigError(KEY, "a user ID's localpart has no whitespace or control characters")
    return text


(MODERATION_BOT_USER_ID,) = declare(
    ConfigKey(
        KEY,
        "str",
        "",
        "User ID of the community's moderation bot: every prohibited verdict sends it a "
        "signed org.matrix.policyserv.command to-device message (redact) over federation. "
        "Empty disables.",
        validate=validate_user_id,
    ),
)
