"""Run the moderator service: redacts refused events that reached other servers.

It reads prohibited verdicts from JetStream (durable consumer ``warden-moderator``)
and, where the room has a moderator with a configured access token
(``PS_MODERATOR_ACCESS_TOKENS``, ``/api/v1/set_room_moderator``), redacts the event
through that moderator's Client-Server API. See ``redactor.py`` for the rules.
Where the community sets ``moderation_bot_user_id``, it also sends the bot a signed
redact command over federation (``commands.py``, ``command_sender.py``).
"""

from __future__ import annotations

from warden.bus.consumer import raise_if_failed, run_with_runtime
from warden.runtime import dependencies
from warden.runtime.identity import load_identity
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_moderator.service import ModeratorService

NAME = "moderator"


def run(settings: Settings) -> int:
    """Entry point for ``warden moderator``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        pool = await dependencies.postgres(runtime)
        nc = await dependencies.nats(runtime)
        # The keys sign redact commands (policy key) and their transactions (federation key).
        identity = load_identity(settings)
        service = await ModeratorService.create(settings, pool, nc.jetstream(), identity=identity)
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        task = run_with_runtime(runtime, "moderator-consumer", service.run, service.aclose)
        await runtime.serve()
        raise_if_failed(task)

    return run_async(main)
