"""Run the gateway: federation, policy and admin HTTP API on ``PS_HTTP_BIND``."""

from __future__ import annotations

from signedjson.key import get_verify_key

from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.runtime import dependencies
from warden.runtime.identity import load_identity
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_gateway.app import build_app
from warden_gateway.policy_api import PolicyAPI
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.room_cache import RoomCache
from warden_gateway.verdict_source import VerdictSource

NAME = "gateway"


def run(settings: Settings) -> int:
    """Entry point for ``warden gateway``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        identity = load_identity(settings)
        pool = await dependencies.postgres(runtime)
        redis = await dependencies.redis(runtime)
        nc = await dependencies.nats(runtime)

        federation = FederationClient(settings, identity.federation_key)
        runtime.add_shutdown_hook("federation-client", federation.aclose)
        keyring = Keyring(
            settings,
            federation,
            redis,
            pool,
            our_server_name=identity.server_name,
            our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
        )
        rooms = RoomCache(pool)
        # Room records change through the admin API of any replica: drop ours at once.
        await nc.subscribe(CONFIG_CHANGED_SUBJECT, cb=rooms.on_config_changed)
        policy = PolicyAPI(
            identity=identity,
            keyring=keyring,
            rooms=rooms,
            verdicts=VerdictSource(redis, nc, timeout_seconds=settings.verdict_timeout_seconds),
            rate_limiter=OriginRateLimiter(
                redis,
                settings.sign_rate_limit_per_origin,
                settings.sign_rate_limit_window_seconds,
            ),
            max_body_bytes=settings.max_pdu_bytes,
        )
        admin_router = None
        if settings.api_key:
            from warden_gateway.admin_api import build_admin_router

            admin_router = build_admin_router(api_key=settings.api_key, pool=pool, nats=nc)
        app = build_app(
            identity, runtime.health, settings=settings, policy=policy, admin_router=admin_router
        )
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
