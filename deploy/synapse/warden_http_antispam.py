"""``synapse-http-antispam`` with room aliases sent as strings: a Synapse module file.

Version 0.5.1 of ``synapse-http-antispam`` passes the ``RoomAlias`` object Synapse gives
``user_may_create_room_alias`` straight to its JSON encoder, which cannot encode it: the
request never leaves Synapse, and an alias is refused or allowed by the module's
``fail_open`` setting alone. This subclass sends the alias as its string
(``#name:server``) and is otherwise the module unchanged. Put this file on Synapse's
``PYTHONPATH`` (next to ``homeserver.yaml``, say, with ``PYTHONPATH`` set to that
directory) and name ``warden_http_antispam.HTTPAntispam`` as the module instead of
``synapse_http_antispam.HTTPAntispam``; the configuration is the same.

It imports only ``synapse_http_antispam``, so it runs in Synapse's own environment.
"""

from __future__ import annotations

from typing import Any

from synapse_http_antispam import HTTPAntispam as _Upstream

__all__ = ["HTTPAntispam"]


class HTTPAntispam(_Upstream):  # type: ignore[misc]
    """``synapse_http_antispam.HTTPAntispam``, with ``room_alias`` as a string."""

    async def user_may_create_room_alias(self, user_id: str, room_alias: Any) -> Any:
        """The upstream callback with the alias's string form."""
        alias = room_alias.to_string() if hasattr(room_alias, "to_string") else str(room_alias)
        return await super().user_may_create_room_alias(user_id, alias)
