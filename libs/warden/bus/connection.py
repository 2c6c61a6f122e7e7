"""Connecting to NATS the same way in every service."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NATS

from warden.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How a service proves itself to NATS beyond what the URL carries.

    User/password and token credentials travel in the URL itself; these are the forms
    that do not fit there. At most one of ``creds_file`` and ``nkey_seed_file``.
    """

    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    # A client certificate for servers that verify clients; the key may be in the
    # certificate file, then ``tls_key_file`` is None.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


def nats_auth(settings: Settings) -> NatsAuth:
    """The ``PS_NATS_*`` credentials and TLS files of ``settings``."""
    return NatsAuth(
        creds_file=settings.nats_creds_file,
        nkey_seed_file=settings.nats_nkey_seed_file,
        tls_ca_file=settings.nats_tls_ca_file,
        tls_cert_file=settings.nats_tls_cert_file,
        tls_key_file=settings.nats_tls_key_file,
    )


def without_credentials(url: str) -> str:
    """``url`` with any password or token replaced by ``***``, for logs and errors.

    Handles comma-separated server lists as NATS accepts them.
    """
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    parts = urlsplit(url.strip())
    if "@" not in parts.netloc:
        return url.strip()
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _secret = userinfo.partition(":")
    # nats://token@host carries a secret with no user name: hide all of it.
    shown = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def _tls_context(auth: NatsAuth, url: str) -> ssl.SSLContext | None:
    if auth.tls_ca_file is None and auth.tls_cert_file is None:
        return None  # nats-py uses the system's trust store for tls:// URLs
    if not any(urlsplit(u.strip()).scheme == "tls" for u in url.split(",")):
        # A CA bundle or client certificate with a plain nats:// URL would silently mean
        # no TLS at all.
        what = "PS_NATS_TLS_CA_FILE" if auth.tls_cert_file is None else "PS_NATS_TLS_CERT_FILE"
        raise ValueError(f"{what} is set but PS_NATS_URL does not use tls://")
    context = ssl.create_default_context(cafile=auth.tls_ca_file)
    if auth.tls_cert_file is not None:
        context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
    return context


# Errors of the connection itself rather than an answer from the server.
_TRANSPORT_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    nats.errors.StaleConnectionError,  # and UnexpectedEOF
    nats.errors.ConnectionClosedError,
)


async def connect_nats(
    url: str,
    *,
    name: str,
    initial_timeout: float = 60.0,
    connect_timeout: int = 5,
    auth: NatsAuth | None = None,
) -> NATS:
    """Connect with unbounded reconnects (a NATS restart must not kill the service).

    nats-py retries the first connection forever too when reconnects are unbounded,
    so the first connection is bounded by ``initial_timeout`` (``TimeoutError``). An
    authorization refusal is not retried by the server, but nats-py keeps trying: it
    surfaces as that timeout, with the server's refusal if it gave one, else the last
    error.
    """
    auth = auth or NatsAuth()
    if auth.creds_file and auth.nkey_seed_file:
        raise ValueError("set at most one of PS_NATS_CREDS_FILE and PS_NATS_NKEY_SEED_FILE")
    # The server's own refusal (``-ERR 'Authorization Violation'``) is what an operator
    # needs. The server closes right after sending it, so a later attempt often ends in
    # a bare connection reset instead (the refusal lost to the TCP reset): a transport
    # error never hides a refusal the server did give.
    last_error: list[str] = []
    refusal: list[str] = []

    async def on_disconnect() -> None:
        # A drain or close of our own also disconnects: not worth a warning.
        if nc.is_closed or nc.is_draining:
            logger.info("nats connection closed", extra={"event": "nats_closed"})
            return
        logger.warning("nats disconnected", extra={"event": "nats_disconnected"})

    async def on_reconnect() -> None:
        logger.info("nats reconnected", extra={"event": "nats_reconnected"})

    async def on_error(exc: Exception) -> None:
        last_error[:] = [f"{type(exc).__name__}: {exc}"]
        if not isinstance(exc, _TRANSPORT_ERRORS):
            refusal[:] = last_error
        logger.warning("nats error", extra={"event": "nats_error", "error": str(exc)})

    nc = NATS()
    connecting = nc.connect(
        url,
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        tls=_tls_context(auth, url),
        user_credentials=auth.creds_file,
        nkeys_seed=auth.nkey_seed_file,
    )
    try:
        await asyncio.wait_for(connecting, initial_timeout)
    except TimeoutError:
        await nc.close()
        if refusal:
            why = f" (the server refused: {refusal[0]})"
        elif last_error:
            why = f" (last error: {last_error[0]})"
        else:
            why = ""
        raise TimeoutError(
            f"no NATS server answered at {without_credentials(url)} within {initial_timeout}s{why}"
        ) from None
    return nc


async def check_nats(nc: NATS) -> None:
    """Readiness: connected, and the server answers a flush round trip."""
    if not nc.is_connected:
        raise ConnectionError("not connected to NATS")
    await nc.flush(timeout=2)
