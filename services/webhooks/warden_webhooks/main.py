"""Run the webhooks service: audit messages to communities' webhooks for refused events.

It reads prohibited verdicts from JetStream (durable consumer ``warden-webhooks``) and
POSTs a Hookshot-style ``{"text", "html"}`` report to the community's ``webhook_url``
when that URL is https, its host is in ``PS_ALLOWED_WEBHOOK_DOMAINS`` and its addresses
pass the SSRF guard. Temporary failures are retried with backoff and every outcome is
recorded in ``webhook_deliveries``.

Delivery is exactly once as seen by a receiver that honours the ``Idempotency-Key``
header (the event ID), and at least once on the wire: see ``notifier.py``.
"""

from __future__ import annotations

from warden.bus.consumer import raise_if_failed, run_with_runtime
from warden.runtime import dependencies
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_webhooks.service import WebhooksService

NAME = "webhooks"


def run(settings: Settings) -> int:
    """Entry point for ``warden webhooks``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        pool = await dependencies.postgres(runtime)
        nc = await dependencies.nats(runtime)
        service = await WebhooksService.create(settings, pool, nc)
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        task = run_with_runtime(runtime, "webhooks-consumer", service.run, service.aclose)
        await runtime.serve()
        raise_if_failed(task)

    return run_async(main)
