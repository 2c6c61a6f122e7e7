"""Run the gateway: federation and policy API on ``PS_HTTP_BIND``; the admin HTTP API
there too, or on ``PS_ADMIN_HTTP_BIND`` when set."""

from __future__ import annotations

from signedjson.key import get_verify_key

from warden.bus.streams import StreamSettings, ensure_inbound_stream, ensure_verdicts_stream
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.federation.client import FederationClient
from warden.federation.event_fetch import EventFetcher
from warden.federation.keyring import Keyring
from warden.federation.membership import MembershipClient
from warden.runtime import dependencies
from warden.runtime.client_penalties import ClientPenalties
from warden.runtime.identity import load_identity
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_gateway.antispam import AntispamAPI
from warden_gateway.app import build_admin_app, build_app
from warden_gateway.community_auth import COMMUNITY_API_RATE_LIMIT_ERRORS, CommunityAuth
from warden_gateway.event_checks import CheckedEvents
from warden_gateway.event_id_check import EventIdCheck
from warden_gateway.federation_inbound import FederationInbound
from warden_gateway.invites import InviteAPI
from warden_gateway.metrics import SEND_RATE_LIMIT_ERRORS
from warden_gateway.moderation_requests import ModerationRequests
from warden_gateway.policy_api import PolicyAPI
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.room_cache import RoomCache
from warden_gateway.room_joins import RoomJoiner, StartupJoins
from warden_gateway.server_centric import ServerCentricAPI
from warden_gateway.verdict_source import VerdictSource

NAME = "gateway"


def run(settings: Settings) -> int:
    """Entry point for ``warden gateway``."""
    runtime = bootstrap(NAME, settings)

    async def main() -> None:
        identity = load_identity(settings)
        pool = await dependencies.postgres(runtime)
        # Not required: /sign keeps answering without it (warden.runtime.redis_outage).
        redis = await dependencies.redis(runtime, required=False)
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
        rate_limiter = OriginRateLimiter(
            redis, settings.sign_rate_limit_per_origin, settings.sign_rate_limit_window_seconds
        )
        runtime.add_shutdown_hook("rate-limit", rate_limiter.aclose)
        js = nc.jetstream()
        # Moderation requests go to the verdict streams.
        await ensure_verdicts_stream(js, limits=StreamSettings.from_settings(settings))
        moderation = ModerationRequests(js)
        runtime.add_shutdown_hook("moderation-requests", moderation.aclose)
        verdicts = VerdictSource(
            nc,
            timeout_seconds=settings.verdict_timeout_seconds,
            # By then a dead worker's claim has lapsed: a second ask gets it taken over.
            reask_after_seconds=settings.evaluation_claim_ttl_seconds,
        )
        # Addresses failing federation authentication past PS_HTTP_AUTH_FAILURE_LIMIT.
        penalties = ClientPenalties.from_settings(settings)
        policy = PolicyAPI(
            identity=identity,
            keyring=keyring,
            rooms=rooms,
            verdicts=verdicts,
            rate_limiter=rate_limiter,
            max_body_bytes=settings.max_pdu_bytes,
            checked_events=CheckedEvents(max_bytes=settings.event_check_cache_max_bytes),
            moderation=moderation,
            penalties=penalties,
        )
        send_limiter = OriginRateLimiter(
            redis,
            settings.send_rate_limit_per_origin,
            settings.send_rate_limit_window_seconds,
            budget="send",
            what="/send PDUs and transactions",
            errors=SEND_RATE_LIMIT_ERRORS,
        )
        runtime.add_shutdown_hook("send-rate-limit", send_limiter.aclose)
        await ensure_inbound_stream(js, StreamSettings.from_settings(settings))
        federation_inbound = FederationInbound(
            server_name=identity.server_name,
            local_user_id=f"@{settings.join_localpart}:{identity.server_name}",
            keyring=keyring,
            rooms=rooms,
            redis=redis,
            js=js,
            max_pdu_bytes=settings.max_pdu_bytes,
            rate_limiter=send_limiter,
        )
        # Joins, leaves and invites (warden.federation.membership), as Warden's user.
        joiner = RoomJoiner(
            settings=settings,
            client=MembershipClient(
                federation,
                server_name=identity.server_name,
                localpart=settings.join_localpart,
                signing_key=identity.federation_key,
                key_id=identity.federation_key_id,
            ),
            pool=pool,
            nats=nc,
            keyring=keyring,
        )
        runtime.add_shutdown_hook("room-joins", joiner.aclose)
        invites = InviteAPI(
            identity=identity, settings=settings, keyring=keyring, pool=pool, joiner=joiner
        )
        startup_joins = StartupJoins(joiner, redis, settings)
        # The server-centric API (/_policyserv/v1), authenticated by community token.
        community_limiter = OriginRateLimiter(
            redis,
            settings.community_api_rate_limit_per_minute,
            60,
            budget="community_api",
            what="server-centric API requests",
            errors=COMMUNITY_API_RATE_LIMIT_ERRORS,
        )
        runtime.add_shutdown_hook("community-rate-limit", community_limiter.aclose)
        community_auth = CommunityAuth(
            pool,
            rate_limiter=community_limiter,
            failures_per_minute=settings.community_api_auth_failures_per_minute,
            cache_seconds=settings.community_token_cache_seconds,
        )
        # A rotation or a change of the community on any replica: drop our copy at once.
        await nc.subscribe(CONFIG_CHANGED_SUBJECT, cb=community_auth.on_config_changed)
        server_centric = ServerCentricAPI(
            auth=community_auth,
            nats=nc,
            pool=pool,
            joiner=joiner,
            max_text_bytes=settings.check_text_max_bytes,
            text_timeout_seconds=settings.check_text_timeout_seconds,
        )
        # check/event_id shares the community-token authentication and its limits.
        event_id_check = EventIdCheck(
            authenticate=server_centric.auth.authenticate,
            pool=pool,
            rooms=rooms,
            verdicts=verdicts,
            fetcher=EventFetcher(
                federation,
                keyring,
                settings.event_fetch_servers,
                timeout_seconds=settings.event_fetch_timeout_seconds,
                total_timeout_seconds=settings.event_fetch_total_timeout_seconds,
                concurrency=settings.event_fetch_concurrency,
                max_response_bytes=settings.event_fetch_max_response_bytes,
                max_pdu_bytes=settings.max_pdu_bytes,
            ),
        )
        # The homeserver spam-checker callbacks share the community-token authentication.
        antispam_limiter = None
        if settings.antispam_rate_limit_per_minute > 0:
            antispam_limiter = OriginRateLimiter(
                redis,
                settings.antispam_rate_limit_per_minute,
                60,
                budget="antispam",
                what="spam-checker callbacks",
                errors=COMMUNITY_API_RATE_LIMIT_ERRORS,
            )
            runtime.add_shutdown_hook("antispam-rate-limit", antispam_limiter.aclose)
        antispam = AntispamAPI(
            auth=server_centric.auth,
            rate_limiter=antispam_limiter,
            nats=nc,
            verdicts=verdicts,
            # A client-format event is a PDU with less, plus ``unsigned``.
            max_body_bytes=2 * settings.max_pdu_bytes,
            timeout_seconds=settings.check_text_timeout_seconds,
        )
        admin_router = None
        if settings.api_key:
            from warden_gateway.admin_api import build_admin_router

            admin_router = build_admin_router(
                api_key=settings.api_key,
                pool=pool,
                nats=nc,
                joiner=joiner,
                server_name=identity.server_name,
                policy_public_key=identity.policy_key_base64,
                auth_failures_per_minute=settings.admin_auth_failures_per_minute,
            )
        # On a listener of its own when PS_ADMIN_HTTP_BIND is set; else beside federation.
        separate_admin = admin_router is not None and bool(settings.admin_http_bind)
        app = build_app(
            identity,
            runtime.health,
            settings=settings,
            policy=policy,
            admin_router=None if separate_admin else admin_router,
            federation=federation_inbound,
            invites=invites,
            event_id_check=event_id_check,
            server_centric=server_centric,
            antispam=antispam,
            penalties=penalties,
        )
        runtime.add_http_server(
            "api",
            app,
            settings.http_bind,
            tls_cert=settings.tls_cert_path,
            tls_key=settings.tls_key_path,
            penalties=penalties,
        )
        if separate_admin and admin_router is not None:
            runtime.add_http_server(
                "admin",
                build_admin_app(admin_router),
                settings.admin_http_bind,
                tls_cert=settings.tls_cert_path,
                tls_key=settings.tls_key_path,
            )
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        # PS_JOIN_ROOM_IDS: joined in the background, by one replica at a time.
        await runtime.serve(background=[startup_joins.run])

    return run_async(main)
