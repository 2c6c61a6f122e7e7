"""``warden check-config``: every setting validated and every dependency reached, before
a rollout rather than in a crash loop.

It reports one line per check (``ok`` or ``FAIL``, what was checked, why it failed) and
exits 0 when everything passed, 1 otherwise. Unlike a service, which stops at the first
bad setting, it lists every bad setting. ``--offline`` skips the network checks (a
CI job that has the settings but not the servers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from warden.settings import ENV_PREFIX, Settings

CONNECT_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    what: str
    ok: bool
    detail: str


def settings_checks(
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings | None, list[Check]]:
    """Validate the settings and the filters' instance defaults; every problem a line."""
    from warden.policy.config import ConfigError, known_keys, parse_env_value
    from warden.policyserv_settings import LEGACY_ENV_NAMES

    env = os.environ if environ is None else environ
    checks: list[Check] = []
    settings: Settings | None = None
    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]).upper() if err["loc"] else "?"
            message = str(err["msg"]).removeprefix("Value error, ")
            checks.append(Check(f"setting {ENV_PREFIX}{field}", False, message))
    bad_keys = 0
    for key in known_keys().values():
        # policyserv's spellings too (e.g. PS_TRIM_FILTER_MAX_DIFFERENCE).
        for env_var in (key.env_var, *LEGACY_ENV_NAMES.get(key.name, ())):
            raw = env.get(env_var)
            if raw is None or not raw.strip():
                continue
            try:
                value = parse_env_value(key, raw)
                if key.validate is not None:
                    key.validate(value)
            except ConfigError as exc:
                bad_keys += 1
                checks.append(Check(f"setting {env_var}", False, exc.message))
    if settings is not None and not bad_keys:
        checks.append(Check("settings", True, "every PS_* variable is valid"))
    return settings, checks


def key_checks(settings: Settings) -> list[Check]:
    """Both key files load, and they differ."""
    from warden.matrix.keys import KeyFileError
    from warden.runtime.identity import load_identity

    try:
        identity = load_identity(settings)
    except KeyFileError as exc:
        return [Check("signing keys", False, str(exc))]
    return [
        Check(
            "signing keys",
            True,
            f"federation key {identity.federation_key_id}, policy key "
            f"{identity.policy_key_base64[:8]}...",
        )
    ]


def tracing_checks(settings: Settings, environ: Mapping[str, str] | None = None) -> list[Check]:
    """``OTEL_TRACES_SAMPLER``/``_ARG`` name a sampler Warden builds (a line only if not)."""
    from warden.telemetry.tracing import build_sampler

    try:
        build_sampler(settings.otel_exporter, settings.otel_sample_ratio, environ)
    except ValueError as exc:
        return [Check("tracing sampler", False, str(exc))]
    return []


async def _postgres(settings: Settings) -> str:
    import asyncpg

    from warden.storage.database import dsn_for_asyncpg
    from warden.storage.migrations import pending

    conn = await asyncpg.connect(dsn_for_asyncpg(settings.database), timeout=CONNECT_SECONDS)
    try:
        version = await conn.fetchval("SHOW server_version")
        missing = await pending(conn)
    finally:
        await conn.close()
    schema = f"{len(missing)} migrations pending" if missing else "schema up to date"
    if missing and not settings.migrate_on_start:
        # Services would wait for `warden migrate` and then fail their start.
        raise RuntimeError(f"PostgreSQL {version}: {schema}; run `warden migrate`")
    return f"PostgreSQL {version}, {schema}"


async def _redis(settings: Settings) -> str:
    from warden.runtime.dependencies import redis_client

    client = redis_client(settings)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return f"Redis {info.get('redis_version', '?')}"


async def _nats(settings: Settings) -> str:
    from warden.bus.connection import connect_nats, nats_auth

    nc = await connect_nats(
        settings.nats_url,
        name="warden-check-config",
        initial_timeout=CONNECT_SECONDS,
        auth=nats_auth(settings),
    )
    try:
        account = await nc.jetstream().account_info()
        v = nc.connected_server_version
    finally:
        await nc.close()
    return f"NATS {v.major}.{v.minor}.{v.patch}, JetStream with {account.streams} streams"


async def dependency_checks(settings: Settings) -> list[Check]:
    """Reach PostgreSQL (and its schema), Redis and NATS with JetStream, at once."""
    probes: dict[str, Callable[[Settings], Awaitable[str]]] = {
        "postgresql": _postgres,
        "redis": _redis,
        "nats": _nats,
    }

    async def one(name: str, probe: Callable[[Settings], Awaitable[str]]) -> Check:
        try:
            detail = await asyncio.wait_for(probe(settings), CONNECT_SECONDS * 2)
        except TimeoutError as exc:
            return Check(name, False, _one_line(exc) if str(exc) else "no answer in time")
        except Exception as exc:  # any failure is the line to print
            return Check(name, False, _one_line(exc))
        return Check(name, True, detail)

    return list(await asyncio.gather(*(one(n, p) for n, p in probes.items())))


def _one_line(exc: BaseException) -> str:
    from warden.bus.connection import without_credentials

    text = " ".join(str(exc).split()) or type(exc).__name__
    # Connection errors may quote a URL; never print its credentials.
    return " ".join(without_credentials(w) if "://" in w else w for w in text.split())


def run(offline: bool = False) -> int:
    """Print the report; exit status 0 when every check passed, else 1."""
    # The report is the output: the clients' own retry warnings would only repeat it.
    logging.disable(logging.WARNING)
    settings, checks = settings_checks()
    if settings is not None:
        checks.extend(key_checks(settings))
        checks.extend(tracing_checks(settings))
        if not offline:
            checks.extend(asyncio.run(dependency_checks(settings)))
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.what}: {check.detail}")
    return 0 if all(c.ok for c in checks) else 1
