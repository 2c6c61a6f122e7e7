"""Run the webhooks service: notifies communities' webhooks of verdicts on JetStream.

For now it connects to its dependencies and reports health; its work arrives with
the policy pipeline.
"""

from __future__ import annotations

from warden.runtime import dependencies
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings

NAME = "webhooks"


def run(settings: Settings) -> int:
    """Entry point for ``warden webhooks``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        await dependencies.postgres(runtime)
        await dependencies.nats(runtime)
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        await runtime.serve()

    return run_async(main)
