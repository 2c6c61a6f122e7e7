"""Run the gateway: federation and policy HTTP API on ``PS_HTTP_BIND``."""

from __future__ import annotations

from warden.runtime import dependencies
from warden.runtime.identity import load_identity
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_gateway.app import build_app

NAME = "gateway"


def run(settings: Settings) -> int:
    """Entry point for ``warden gateway``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        identity = load_identity(settings)
        await dependencies.postgres(runtime)
        await dependencies.redis(runtime)
        await dependencies.nats(runtime)
        app = build_app(identity, runtime.health)
        runtime.add_http_server(
            "api",
            app,
            settings.http_bind,
            tls_cert=settings.tls_cert_path,
            tls_key=settings.tls_key_path,
        )
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        await runtime.serve()

    return run_async(main)
