"""Settings from ``PS_*`` environment variables.

Names and defaults follow the Go reference implementation (policyserv) wherever the
setting exists there, so operators can move over unchanged; settings new to Warden's
design are marked as such. List-valued settings are comma-separated, as in policyserv.

A bad value stops a service at start with one line naming the variable
(see ``load_settings``). policyserv's settings that Warden does not use are accepted and
warned about at start (``warden.policyserv_settings``).
"""

from __future__ import annotations

import ipaddress
import ssl
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_origin

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from warden.matrix.ids import KeyID, ServerName
from warden.secret_files import SecretFilesSource, check_secret_file_problem

ENV_PREFIX = "PS_"

# Private, loopback, link-local, CGNAT, multicast, reserved and cloud-metadata ranges,
# for IPv4 and IPv6. Outbound federation never connects there unless allowed.
DEFAULT_DENIED_NETWORKS = (
    "0.0.0.0/8,10.0.0.0/8,100.64.0.0/10,127.0.0.0/8,169.254.0.0/16,172.16.0.0/12,"
    "192.0.0.0/24,192.0.2.0/24,192.168.0.0/16,198.18.0.0/15,198.51.100.0/24,"
    "203.0.113.0/24,224.0.0.0/4,240.0.0.0/4,255.255.255.255/32,"
    "::/128,::1/128,64:ff9b::/96,64:ff9b:1::/48,100::/64,2001:db8::/32,fc00::/7,"
    "fe80::/10,fec0::/10,ff00::/8"
)

CSV = Annotated[list[str], NoDecode]

# Settings for which an empty variable is a value of its own rather than "unset".
_EMPTY_IS_A_VALUE = frozenset({"key_query_server", "muninn_hall_source_api_url"})


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


@dataclass(frozen=True)
class NotaryServer:
    """A key notary (``PS_KEY_QUERY_SERVER``): its name and its pinned key."""

    server_name: ServerName
    key_id: KeyID
    verify_key_base64: str


class Settings(BaseSettings):
    """All of Warden's settings. Every service reads the same set."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- Identity and keys (policyserv names) ---
    homeserver_name: str = "localhost"
    homeserver_signing_key_path: str = "./signing.key"
    # policyserv's code default equals the federation key's path outside Docker, which
    # would sign events with the published key; Warden uses a separate file.
    homeserver_event_signing_key_path: str = "./event_signing.key"

    # --- HTTP ---
    http_bind: str = "0.0.0.0:8080"
    http_metrics_bind: str = "0.0.0.0:8081"
    tls_cert_path: str | None = None  # Warden: the gateway terminates TLS when set
    tls_key_path: str | None = None

    # --- Storage and bus ---
    # Secret-bearing settings (database, redis_url, nats_url, api_key,
    # moderator_access_tokens, redis_sentinel_password) also accept PS_<NAME>_FILE, a file
    # holding the value (warden.secret_files).
    database: str = Field(
        default="postgres://policyserv:devonly@localhost/policyserv?sslmode=disable",
        repr=False,
    )
    database_max_open_conns: int = Field(default=10, ge=1)
    database_max_idle_conns: int = Field(default=5, ge=0)
    # Warden: asyncpg's prepared-statement cache per connection (asyncpg's default, 100).
    # 0 behind PgBouncer in transaction mode (before 1.21, or without
    # max_prepared_statements): a statement prepared on one server connection is not there
    # on the next.
    database_statement_cache_size: int = Field(default=100, ge=0)
    # Warden: apply pending migrations when a service starts. Off, a service waits (up to
    # PS_STARTUP_TIMEOUT_SECONDS) for `warden migrate` to bring the schema up to date, so
    # services can run as a role without DDL rights.
    migrate_on_start: bool = True
    # Warden. Credentials may be given in the URL (nats://user:password@host, or
    # nats://token@host); tls://host makes the connection use TLS.
    nats_url: str = Field(default="nats://127.0.0.1:4222", repr=False)
    # Warden: NATS authentication beyond the URL: a user credentials file (JWT and NKey
    # seed, as `nsc` writes it) or a bare NKey seed file; a CA bundle (PEM) for a TLS
    # server with a private CA. See docs/security-model.md.
    nats_creds_file: str | None = None
    nats_nkey_seed_file: str | None = None
    nats_tls_ca_file: str | None = None
    # Warden: a client certificate (PEM) for a NATS server that verifies clients
    # (tls { verify: true }); the key file may be omitted when the certificate file
    # holds the key too. Needs a tls:// URL.
    nats_tls_key_file: str | None = None
    nats_tls_cert_file: str | None = Field(default=None, validate_default=True)
    # Warden. A password goes in the URL (redis://:password@host/0, or
    # redis://user:password@host/0 with Redis ACLs); rediss:// uses TLS
    # (?ssl_ca_certs=/path/ca.pem for a private CA).
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    # Warden: Redis behind Sentinel. With sentinels set, the master is the one the
    # sentinels name for PS_REDIS_SENTINEL_MASTER, and PS_REDIS_URL gives only the
    # master's user, password, database and TLS (its host and port are not used).
    # The sentinels' own password (their requirepass), if any, is separate.
    redis_sentinel_master: str = ""
    redis_sentinels: CSV = Field(default_factory=list)  # host:port,...
    redis_sentinel_password: str = Field(default="", repr=False)
    # Warden: each service's Redis connection pool. A command past the maximum waits for
    # a free connection up to the timeout (then fails as a Redis error: 503 or the
    # caller's fallback) instead of failing at once.
    redis_max_connections: int = Field(default=100, ge=1)
    redis_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    # Warden: JetStream stream limits (see docs/operator-guide.md, "JetStream streams"). Unset means
    # "Warden's default when the stream is created, and whatever the stream has once it
    # exists", so a start never undoes what an operator set with `nats stream edit`; a
    # value set here is applied to the existing stream at start (and logged).
    jetstream_replicas: int | None = Field(default=None, ge=1, le=5)
    jetstream_storage: Literal["file", "memory"] = "file"  # for new streams only
    jetstream_verdicts_max_bytes: int | None = Field(default=None, ge=1024 * 1024)
    jetstream_verdicts_max_age_seconds: float | None = Field(default=None, gt=0)
    # Warden: also stream neutral and allowed verdicts to WARDEN_VERDICT_LOG, a record for
    # the operator's own consumers. Off, they are kept only in PostgreSQL: no JetStream
    # write, no outbox update (refusals always go to WARDEN_VERDICTS).
    jetstream_verdict_log: bool = False
    jetstream_verdict_log_max_bytes: int | None = Field(default=None, ge=1024 * 1024)
    jetstream_verdict_log_max_age_seconds: float | None = Field(default=None, gt=0)
    jetstream_inbound_max_bytes: int | None = Field(default=None, ge=1024 * 1024)
    jetstream_inbound_max_age_seconds: float | None = Field(default=None, gt=0)

    # --- Federation and keys of other servers ---
    key_query_server: str = "matrix.org,ed25519:a_RXGa,l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"
    direct_key_fetching: bool = False
    # Warden: retired federation keys still published as old_verify_keys after a
    # rotation, so others can verify what they signed: comma-separated
    # "ed25519:<id>=<base64 public key>@<expired_ts ms>" (see docs/operator-guide.md, "Keys").
    old_verify_keys: str = ""
    homeserver_allowed_networks: CSV = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    homeserver_denied_networks: CSV = Field(
        default_factory=lambda: _split_csv(DEFAULT_DENIED_NETWORKS)
    )
    federation_verify_tls: bool = True  # Warden
    federation_timeout_seconds: float = Field(default=30.0, gt=0)  # Warden
    # Warden: extra CA bundle (PEM) trusted for outbound federation TLS, on top of the
    # system's; for private deployments and tests.
    federation_ca_file: str | None = None
    key_fetch_timeout_seconds: float = Field(default=10.0, gt=0)  # Warden
    key_negative_cache_seconds: int = Field(default=60, ge=0)  # Warden
    trusted_origins: CSV = Field(default_factory=lambda: ["matrix.org", "element.io"])
    # How often one filter worker refreshes every protected room's state with GET
    # /state from the first answering trusted origin (policyserv's name and default).
    state_cache_interval_minutes: float = Field(default=60.0, gt=0)
    # The localpart of Warden's own user in protected rooms (policyserv's name/default).
    join_localpart: str = "policyserv"
    # The server asked to join rooms through when no "via" is given (policyserv's name
    # and default).
    join_server: str = "matrix.org"
    # Rooms joined into the "default" community at start, retried with backoff until
    # joined (policyserv's name; a failure there is fatal, in Warden it is retried).
    join_room_ids: CSV = Field(default_factory=list)
    # Warden: invites to these rooms are accepted into the "default" community.
    invite_allowed_room_ids: CSV = Field(default_factory=list)
    # Warden: first delay between start-up join attempts of a room; doubles up to 300 s.
    join_retry_base_seconds: float = Field(default=5.0, gt=0)

    # --- Admin API (/api/v1) ---
    # Bearer key of the admin API (policyserv's name and default); empty disables the API.
    api_key: str = Field(default="", repr=False)

    # --- Server-centric API (/_policyserv/v1, community access tokens; Warden) ---
    # Requests one community (one token) may make per minute, shared by every gateway
    # replica through Redis; past it 429 M_LIMIT_EXCEEDED. 0 turns the limit off.
    community_api_rate_limit_per_minute: int = Field(default=300, ge=0)
    # Failed token authentications allowed per client address per minute; past it,
    # 429 M_LIMIT_EXCEEDED until the minute ends.
    community_api_auth_failures_per_minute: int = Field(default=10, ge=1)
    # How long a gateway keeps a community token it found (0: ask PostgreSQL each time).
    # A rotation or any change of the community drops it at once on every replica
    # (CONFIG_CHANGED_SUBJECT); the period only bounds staleness if that message is lost.
    community_token_cache_seconds: float = Field(default=10.0, ge=0, le=300)
    # Spam-checker callbacks (/_warden/antispam/v1) one community token may make per
    # minute, shared by every replica (0: no limit). Apart from the server-centric API's
    # budget: a homeserver asks once per message its users send.
    antispam_rate_limit_per_minute: int = Field(default=0, ge=0)
    # Largest text /_policyserv/v1/check/text accepts (413 M_TOO_LARGE past it).
    check_text_max_bytes: int = Field(default=64 * 1024, ge=1, le=512 * 1024)
    # How long the gateway waits for a filter worker's text check (then 503).
    check_text_timeout_seconds: float = Field(default=5.0, gt=0)

    # --- Filters (Warden) ---
    # Bound on one filter's run; past it the filter counts as failed (see each filter's
    # <name>_fail_secure community key).
    filter_timeout_seconds: float = Field(default=5.0, gt=0)
    # How often each worker publishes verdicts whose JetStream message was lost (Warden).
    outbox_sweep_seconds: float = Field(default=30.0, gt=0)
    # While a worker is answering a batch, how long requests arriving meanwhile wait to
    # form the next one (Warden; 0 dispatches each loop iteration's requests at once).
    evaluation_batch_linger_ms: float = Field(default=2.0, ge=0, le=100)
    # How long a worker's claim on an event it is evaluating lasts without being renewed
    # (Warden). The live holder renews it every third of this; a crashed worker's claims
    # lapse after it and are taken over, well before waiting requests give up.
    evaluation_claim_ttl_seconds: float = Field(default=5.0, ge=1, le=60)
    # Warden: how long a worker keeps a verdict in Redis for the workers' repeats
    # (warden:verdict:<event_id>). Repeats come within seconds to minutes; PostgreSQL keeps
    # every verdict, so a later repeat costs a lookup, not an evaluation. Redis holds about
    # a kilobyte per new event for this long, so this bounds its memory.
    verdict_cache_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)

    # --- Moderator (redactions through the Client-Server API) ---
    # policyserv's format: "csapi-domain:token,..." (a bare domain means https://domain).
    # Warden also accepts a full base URL before the last colon, e.g.
    # "http://127.0.0.1:8008:syt_abc", for private deployments and tests.
    moderator_access_tokens: CSV = Field(default_factory=list)
    moderation_pool_size: int = Field(default=25, ge=1)  # messages handled at once
    moderation_timeout_seconds: float = Field(default=30.0, gt=0)  # Warden
    # Warden: tries per redaction on temporary failures (5xx, 429, timeouts) before it
    # is recorded as failed; the delay doubles from the base, capped at five minutes.
    moderation_max_attempts: int = Field(default=10, ge=1)
    moderation_retry_base_seconds: float = Field(default=2.0, gt=0)
    # Warden: to-device redaction commands to a community's moderation_bot_user_id
    # (reference §2.3), queued in PostgreSQL per destination server. Commands older
    # than the retention are dropped unsent (counted); a destination holds at most
    # max_queued; failed transactions back off from base to max per destination.
    moderation_command_retention_hours: float = Field(default=72.0, gt=0)
    moderation_command_max_queued: int = Field(default=100_000, ge=1)
    moderation_command_backoff_base_seconds: float = Field(default=5.0, gt=0)
    moderation_command_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    moderation_command_concurrency: int = Field(default=10, ge=1)  # destinations at once
    moderation_command_poll_seconds: float = Field(default=5.0, gt=0)  # catch-up scan

    # --- Audit webhooks ---
    # Hosts that webhooks may be sent to: each entry matches itself and its subdomains.
    allowed_webhook_domains: CSV = Field(default_factory=lambda: ["element.ems.host"])
    webhook_pool_size: int = Field(default=5, ge=1)  # messages handled at once
    webhook_timeout_seconds: float = Field(default=30.0, gt=0)  # Warden
    webhook_max_attempts: int = Field(default=6, ge=1)  # Warden, as moderation_max_attempts
    webhook_retry_base_seconds: float = Field(default=2.0, gt=0)  # Warden
    # Warden: extra CA bundle (PEM) trusted for webhook targets, on top of the system's.
    webhook_ca_file: str | None = None

    # --- Trust sources (the untrusted-media filter) ---
    # The Muninn Hall member directory, polled about hourly by one filter worker
    # (policyserv's names and default). Empty URL or key: no polling (the admin API's
    # /sources/muninn/set_member_directory_event still sets it).
    muninn_hall_source_api_url: str = (
        "https://mau.bot/_matrix/maubot/plugin/muninnbot/member_directory"
    )
    muninn_hall_source_api_key: str = Field(default="", repr=False)

    # --- Policy API: /sign, /check and the well-known documents ---
    # Warden: largest /sign or /check body accepted; enforced while reading, whatever
    # Content-Length says.
    max_pdu_bytes: int = Field(default=65536, ge=1024)
    # Warden: how long the gateway waits for a filter worker's verdict before answering
    # 503 (the evaluation goes on; a retry finds the verdict in the caches).
    verdict_timeout_seconds: float = Field(default=10.0, gt=0)
    # Warden: per-origin budget of policy API requests (/sign, /check) per fixed window,
    # shared by every gateway replica through Redis; 0 turns the limit off.
    sign_rate_limit_per_origin: int = Field(default=3000, ge=0)
    sign_rate_limit_window_seconds: int = Field(default=10, ge=1, le=3600)
    # Warden: per-origin budget of /send per fixed window, shared like the above: each
    # transaction costs 1 plus its number of PDUs (429 M_LIMIT_EXCEEDED past it; 0 off).
    send_rate_limit_per_origin: int = Field(default=3000, ge=0)
    send_rate_limit_window_seconds: int = Field(default=10, ge=1, le=3600)
    # Warden: bytes the gateway keeps of /sign bodies whose event checks passed (the
    # event-check cache; 0 turns it off).
    event_check_cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # Warden: "m.server" of /.well-known/matrix/server; empty means
    # "<PS_HOMESERVER_NAME>:443", policyserv's fixed answer.
    well_known_server: str = ""
    # /.well-known/matrix/support (policyserv names): "@user:server" entries are Matrix
    # IDs, other entries must be e-mail addresses.
    support_admin_contacts: CSV = Field(default_factory=list)
    support_security_contacts: CSV = Field(default_factory=list)
    support_url: str = ""

    # --- Operations (Warden) ---
    log_level: str = "INFO"
    log_content: bool = False  # include event content in debug logs
    shutdown_delay_seconds: float = Field(default=5.0, ge=0)  # readiness 503 before draining
    shutdown_timeout_seconds: float = Field(default=25.0, gt=0)
    startup_timeout_seconds: float = Field(default=60.0, gt=0)  # wait for dependencies
    otel_exporter: str = "none"  # "none", "console" or "otlp"
    # New traces recorded when exporting (OTEL_TRACES_SAMPLER/_ARG override it).
    otel_sample_ratio: float = Field(default=0.01, ge=0, le=1)

    # --- Bounded work (Warden) ---
    # Deliveries of one JetStream message (room-state, moderator and webhook consumers)
    # before it is dead-lettered: terminated, logged, counted. The moderator and webhooks
    # use at least their own *_max_attempts.
    bus_max_deliveries: int = Field(default=10, ge=1)

    # --- Learned room state (Warden, issue 10) ---
    # Per-room caps on what /send, a join's send_join answer or a refresh can make
    # Warden keep: users with a membership (joined, invited, banned, knocking), joined
    # members' display names (what the mentions filter loads), and policy rules. Past a
    # cap new entries are not learned (existing ones still change), and
    # warden_room_state_cap_hits_total{kind} counts it.
    room_state_max_members: int = Field(default=200_000, ge=1)
    room_state_max_displaynames: int = Field(default=200_000, ge=1)
    room_state_max_policy_rules: int = Field(default=50_000, ge=1)
    # Longer display names are learned as "" (only the user ID counts for mentions);
    # Synapse caps its own users' names at 256 characters.
    room_state_max_displayname_length: int = Field(default=256, ge=1)
    # Background joins after accepted invites that may run at once per gateway (each
    # retries for minutes; one per room); an invite beyond it is answered 503 with
    # Retry-After, before it is counter-signed.
    invite_join_max_pending: int = Field(default=16, ge=1)

    # --- HTTP front: bounds every listener enforces before any app code (Warden) ---
    # Request target (path and query) longer than this: 414.
    http_max_url_bytes: int = Field(default=8192, ge=256)
    # Header block (names and values) larger than this, or more fields than this: 431.
    http_max_header_bytes: int = Field(default=16384, ge=1024)
    http_max_headers: int = Field(default=64, ge=8)
    # The request line and headers must arrive within this of the connection (or of the
    # request's first byte on a kept-alive one); the body within the other of the head.
    # Past either: 408 and the connection is closed.
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    # An idle kept-alive connection is closed after this. Longer than the idle timeout
    # of common proxies and load balancers (60 s for ingress-nginx and AWS ALB): a
    # backend closing first races the proxy's reuse of the connection (intermittent 502).
    http_keep_alive_seconds: float = Field(default=75.0, gt=0)
    # Requests handled at once per listener; the next gets 503 with Retry-After.
    http_max_concurrency: int = Field(default=1024, ge=1)
    # Open connections per listener; the next gets 503 and is closed.
    http_max_connections: int = Field(default=10000, ge=1)
    # Failed federation authentications (or unreadable requests before it) from one client
    # address within 10 s after which the address is refused for the penalty (Warden;
    # 0: never). A homeserver fails one now and then, never a hundred in ten seconds.
    http_auth_failure_limit: int = Field(default=100, ge=0)
    # How long a penalised address is refused: 429 and closed as its connections open.
    http_auth_failure_penalty_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Penalised addresses' packets dropped by the kernel at the listening sockets (a
    # socket filter, Linux) rather than each connection refused by the HTTP front.
    http_auth_failure_kernel_drop: bool = True
    # The admin API (/api/v1) on a listener of its own, e.g. 127.0.0.1:8082. Empty: on
    # PS_HTTP_BIND with federation, which exposes it to the internet (not recommended).
    admin_http_bind: str = ""
    # Failed admin authentications allowed per client address per minute; past it,
    # 429 M_LIMIT_EXCEEDED until the minute ends.
    admin_auth_failures_per_minute: int = Field(default=10, ge=1)

    # --- Key fetches made on behalf of unauthenticated requests (Warden) ---
    # Fetches of other servers' keys in flight at once, per process; a request that
    # needs one more waits a second for a slot, then gets 401 (event signature checks
    # wait as long as it takes).
    key_fetch_concurrency: int = Field(default=16, ge=1)
    # Fetches one client address may start within a minute (X-Matrix lookups); past it,
    # 401 without fetching.
    key_fetches_per_client_per_minute: int = Field(default=60, ge=1)
    # A key lookup that timed out or could not connect is not retried for this long
    # (definitive failures: PS_KEY_NEGATIVE_CACHE_SECONDS).
    key_negative_cache_timeout_seconds: int = Field(default=10, ge=0)

    # --- HMA media scanning (policyserv names, issue 12) ---
    # Base URL of the Hasher-Matcher-Actioner service; empty turns media scanning off
    # whatever the communities' hma_filter_enabled_banks say.
    hma_api_url: str = ""
    hma_api_key: str = Field(default="", repr=False)  # sent as "Authorization: Bearer"
    # The Client-Server API media are downloaded from (authenticated media,
    # /_matrix/client/v1/media/download), and the access token of a user there.
    homeserver_media_client_url: str = "https://matrix-client.matrix.org"
    homeserver_media_client_access_token: str = Field(default="", repr=False)
    # Warden: largest media downloaded for hashing; larger media count as failed scans
    # (see hma_fail_secure). And the bound on one event's whole scan (download, hash,
    # lookups), which replaces PS_FILTER_TIMEOUT_SECONDS for the HMA filter.
    hma_max_media_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    hma_timeout_seconds: float = Field(default=30.0, gt=0)
    # Warden: media whose scan failed (download error, HMA error, timeout) is not tried
    # again for this long, by any replica; asks meanwhile give no verdict. 0: retry on
    # every ask.
    hma_failure_cache_seconds: float = Field(default=60.0, ge=0)
    # Warden: where media downloads may connect, checked at connect time like
    # federation's PS_HOMESERVER_ALLOWED/DENIED_NETWORKS (deny wins). A homeserver on a
    # private network is allowed by listing its network here, not by weakening federation.
    homeserver_media_client_allowed_networks: CSV = Field(
        default_factory=lambda: ["0.0.0.0/0", "::/0"]
    )
    homeserver_media_client_denied_networks: CSV = Field(
        default_factory=lambda: _split_csv(DEFAULT_DENIED_NETWORKS)
    )

    # --- Server-centric API: POST /_policyserv/v1/check/event_id (issue 13) ---
    # Servers asked for an event Warden has no verdict for (policyserv's name), all at
    # once; the first copy that verifies wins. Empty: only stored verdicts are answered.
    event_fetch_servers: CSV = Field(default_factory=list)
    # Warden: bound on one server's answer, and on the whole fetch and verification.
    event_fetch_timeout_seconds: float = Field(default=10.0, gt=0)
    event_fetch_total_timeout_seconds: float = Field(default=30.0, gt=0)
    # Warden: event fetches in flight at once per gateway; a check that needs one more
    # waits for a slot within its total timeout, then gets 503 with Retry-After.
    event_fetch_concurrency: int = Field(default=16, ge=1)
    # Warden: largest answer read from a server (the event must also fit PS_MAX_PDU_BYTES).
    event_fetch_max_response_bytes: int = Field(default=256 * 1024, ge=1024)

    # --- Retention (issue 15; all Warden's own; 0 days = keep forever) ---
    # Verdicts' details (sender, origin, filter outcomes) are cleared after this many days;
    # the minimal verdict (event ID, class, harms, reference hash) stays.
    retention_verdict_details_days: float = Field(default=90.0, ge=0)
    # Minimal verdicts are deleted after this many days; an event asked about again
    # afterwards is judged afresh. 0: kept forever (one verdict per event, ever).
    retention_verdicts_days: float = Field(default=0.0, ge=0)
    # Final webhook deliveries and moderation actions are deleted after this many days.
    retention_deliveries_days: float = Field(default=30.0, ge=0)
    # Learned state of rooms Warden left is deleted this many days after it last changed.
    retention_left_rooms_days: float = Field(default=7.0, ge=0)
    # Media scan results (media_hashes, media_classifications) are deleted this many days
    # after the scan or judgement; media asked about again is scanned afresh.
    retention_media_days: float = Field(default=30.0, ge=0)
    # How often one filter worker prunes (0: workers never do; use `warden prune`).
    retention_interval_minutes: float = Field(default=60.0, ge=0)
    # Rows one pruning statement changes at most, and the pause between statements.
    retention_batch_size: int = Field(default=1000, ge=1, le=100_000)
    retention_batch_pause_ms: float = Field(default=100.0, ge=0, le=60_000)

    # --- OpenAI-compatible moderation filter (issue 12; warden.openai_moderation) ---
    # policyserv's name: the service's API key; empty (and no key file) disables the
    # filter. Never logged. The rooms it runs in are PS_OPENAI_FILTER_ALLOWED_ROOM_IDS,
    # an instance-only filter key (warden.filters.openai_moderation).
    openai_filter_api_key: str = Field(default="", repr=False)
    # Warden: the key read from this file instead (surrounding whitespace dropped).
    openai_filter_api_key_file: str | None = None
    # Warden: any OpenAI-compatible moderation endpoint (POST <base>/moderations), http
    # or https; a locally served model needs its network in ..._ALLOWED_NETWORKS.
    openai_filter_base_url: str = "https://api.openai.com/v1"
    openai_filter_model: str = "omni-moderation-latest"  # Warden
    # Warden: bound on classifying one event (PS_FILTER_TIMEOUT_SECONDS also applies).
    openai_filter_timeout_seconds: float = Field(default=4.0, gt=0)
    # Warden: events one worker classifies at once; the next fails at once (a
    # dependency failure, see the filter's openai_filter_fail_secure).
    openai_filter_max_concurrency: int = Field(default=16, ge=1)
    # Warden: networks the service may be reached in although PS_HOMESERVER_DENIED_NETWORKS
    # denies them (e.g. 127.0.0.1/32 for a model served on this host).
    openai_filter_allowed_networks: CSV = Field(default_factory=list)
    # Warden: extra CA bundle (PEM) trusted for the service, on top of the system's.
    openai_filter_ca_file: str | None = None

    @field_validator(
        "homeserver_allowed_networks",
        "homeserver_denied_networks",
        "trusted_origins",
        "join_room_ids",
        "invite_allowed_room_ids",
        "moderator_access_tokens",
        "allowed_webhook_domains",
        "support_admin_contacts",
        "support_security_contacts",
        "event_fetch_servers",
        "openai_filter_allowed_networks",
        "homeserver_media_client_allowed_networks",
        "homeserver_media_client_denied_networks",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """PS_<NAME>_FILE of the secret settings, between the arguments and the
        environment (setting both PS_X and PS_X_FILE is refused, so order is moot)."""
        secret_files = SecretFilesSource(settings_cls)
        return init_settings, secret_files, env_settings, dotenv_settings, file_secret_settings

    @field_validator("*", mode="before")
    @classmethod
    def _secret_file_problem(cls, value: Any) -> Any:
        return check_secret_file_problem(value)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty variable means "not set", as Compose files and Helm templates write
        them (``PS_JOIN_SERVER=`` used to stop every service). Except where empty is a
        value policyserv documents: a list (empty disables it, e.g. the keyword list) and
        ``PS_KEY_QUERY_SERVER`` (empty: no notary)."""
        if value != "" or info.field_name is None:
            return value
        field = cls.model_fields[info.field_name]
        if get_origin(field.annotation) is list or info.field_name in _EMPTY_IS_A_VALUE:
            return value
        return field.get_default(call_default_factory=True)

    @field_validator("event_fetch_servers")
    @classmethod
    def _event_fetch_servers(cls, value: list[str]) -> list[str]:
        from warden.federation.xmatrix import is_valid_server_name

        for server in value:
            if not is_valid_server_name(server):
                raise ValueError(f"{server!r} is not a server name (host or host:port)")
        return value

    @field_validator(
        "homeserver_allowed_networks",
        "homeserver_denied_networks",
        "openai_filter_allowed_networks",
        "homeserver_media_client_allowed_networks",
        "homeserver_media_client_denied_networks",
    )
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a valid CIDR network ({exc})") from None
        return value

    @field_validator("join_room_ids", "invite_allowed_room_ids")
    @classmethod
    def _room_ids(cls, value: list[str]) -> list[str]:
        for room_id in value:
            if not room_id.startswith("!") or len(room_id.encode()) > 255 or len(room_id) < 2:
                raise ValueError(f"{room_id!r} is not a room ID ('!opaque:server' or '!hash')")
        return value

    @field_validator("join_server")
    @classmethod
    def _join_server(cls, value: str) -> str:
        from warden.federation.xmatrix import is_valid_server_name

        if not is_valid_server_name(value):
            raise ValueError(f"{value!r} is not a server name (host or host:port)")
        return value

    @field_validator("http_bind", "http_metrics_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_bind(value)
        return value

    @field_validator("admin_http_bind")
    @classmethod
    def _admin_bind(cls, value: str) -> str:
        if value:
            parse_bind(value)
        return value

    @field_validator("federation_ca_file", "nats_tls_ca_file", "openai_filter_ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            ssl.create_default_context().load_verify_locations(cafile=value)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA bundle {value!r}: {exc}") from None
        return value

    @field_validator("nats_tls_cert_file")
    @classmethod
    def _nats_tls_cert(cls, value: str | None, info: ValidationInfo) -> str | None:
        key = info.data.get("nats_tls_key_file")
        if not value:
            if key:
                raise ValueError("PS_NATS_TLS_KEY_FILE is set but PS_NATS_TLS_CERT_FILE is not")
            return None
        if "nats_tls_key_file" not in info.data:
            return value  # the key file itself was refused; that error is reported
        try:
            ssl.create_default_context().load_cert_chain(value, key)
        except (OSError, ssl.SSLError) as exc:
            # Without PS_NATS_TLS_KEY_FILE the certificate file must hold the key too.
            raise ValueError(f"cannot load client certificate {value!r}: {exc}") from None
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinels_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for sentinel in value:
            host, sep, port = sentinel.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{sentinel!r} is not host:port")
        if value and not info.data.get("redis_sentinel_master"):
            raise ValueError("PS_REDIS_SENTINEL_MASTER must name the master's service")
        return value

    @field_validator(
        "nats_creds_file", "nats_nkey_seed_file", "nats_tls_key_file", "openai_filter_api_key_file"
    )
    @classmethod
    def _readable_secret_file(cls, value: str | None) -> str | None:
        # Fail at start with the setting's name rather than at the first reconnect.
        if not value:
            return None
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value!r}: {exc.strerror}") from None
        return value

    @field_validator("openai_filter_base_url")
    @classmethod
    def _openai_base_url(cls, value: str) -> str:
        from warden.openai_moderation import check_base_url

        check_base_url(value)
        return value

    @field_validator("key_query_server")
    @classmethod
    def _notary(cls, value: str) -> str:
        _parse_notary(value)
        return value

    @field_validator("old_verify_keys")
    @classmethod
    def _old_keys(cls, value: str) -> str:
        parse_old_verify_keys(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("otel_exporter")
    @classmethod
    def _otel(cls, value: str) -> str:
        if value not in {"none", "console", "otlp"}:
            raise ValueError("must be 'none', 'console' or 'otlp'")
        return value

    @field_validator("moderator_access_tokens")
    @classmethod
    def _moderator_tokens(cls, value: list[str]) -> list[str]:
        parse_moderator_tokens(value)
        return value

    @field_validator("allowed_webhook_domains")
    @classmethod
    def _webhook_domains(cls, value: list[str]) -> list[str]:
        return [d.lower().rstrip(".") for d in value]

    @field_validator("webhook_ca_file")
    @classmethod
    def _webhook_ca_file(cls, value: str | None) -> str | None:
        return _load_ca_file(value)

    @field_validator("support_admin_contacts", "support_security_contacts")
    @classmethod
    def _support_contacts(cls, value: list[str]) -> list[str]:
        for contact in value:
            support_contact(contact)
        return value

    @field_validator("well_known_server")
    @classmethod
    def _well_known_server(cls, value: str) -> str:
        from warden.federation.xmatrix import is_valid_server_name

        if value and not is_valid_server_name(value):
            raise ValueError(f"{value!r} is not a server name (host or host:port)")
        return value

    @property
    def server_name(self) -> ServerName:
        """Our own server name, typed."""
        return ServerName(self.homeserver_name)

    @property
    def notary(self) -> NotaryServer | None:
        """The pinned notary, or None when ``PS_KEY_QUERY_SERVER`` is empty."""
        return _parse_notary(self.key_query_server)

    @property
    def old_federation_keys(self) -> list[OldVerifyKey]:
        """The retired federation keys of ``PS_OLD_VERIFY_KEYS``, in the order given."""
        return parse_old_verify_keys(self.old_verify_keys)


@dataclass(frozen=True)
class ModeratorToken:
    """One ``PS_MODERATOR_ACCESS_TOKENS`` entry: a client API base URL and its token."""

    base_url: str  # scheme://host[:port][/prefix], no trailing slash
    access_token: str

    def __repr__(self) -> str:  # never print the secret
        return f"ModeratorToken(base_url={self.base_url!r}, access_token=<hidden>)"


def parse_moderator_tokens(entries: list[str]) -> list[ModeratorToken]:
    """Parse ``PS_MODERATOR_ACCESS_TOKENS`` entries (``domain:token`` or ``url:token``).

    The token follows the last colon. Errors name the entry by position, never its
    token.
    """
    from urllib.parse import urlsplit

    tokens: list[ModeratorToken] = []
    for position, entry in enumerate(entries, start=1):
        base, sep, token = entry.strip().rpartition(":")
        if not sep or not base or not token or any(c.isspace() for c in token):
            raise ValueError(f"entry {position} is not 'domain:token' or 'https://host:token'")
        if "://" not in base:
            base = "https://" + base
        parts = urlsplit(base)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"entry {position} has an invalid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(f"entry {position} does not name an http(s) client API host")
        tokens.append(ModeratorToken(base.rstrip("/"), token))
    return tokens


def _load_ca_file(value: str | None) -> str | None:
    if not value:
        return None
    try:
        ssl.create_default_context().load_verify_locations(cafile=value)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load CA bundle {value!r}: {exc}") from None
    return value


def support_contact(contact: str) -> dict[str, str]:
    """One ``PS_SUPPORT_*_CONTACTS`` entry as a support-document contact (without role).

    As in policyserv: an entry starting with ``@`` is a Matrix user ID, any other entry
    must be an e-mail address. Raises ``ValueError`` for anything else.
    """
    if contact.startswith("@"):
        _, sep, server = contact.partition(":")
        if not sep or not server or len(contact) < 4:
            raise ValueError(f"{contact!r} is not a Matrix user ID '@user:server'")
        return {"matrix_id": contact}
    local, sep, domain = contact.rpartition("@")
    if not sep or not local or not domain:
        raise ValueError(f"{contact!r} is neither a Matrix user ID nor an e-mail address")
    return {"email_address": contact}


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def local_url(bind: str) -> str:
    """The ``http://`` base a client on this machine uses for a server bound to ``bind``
    (a wildcard address is reached on loopback)."""
    host, port = parse_bind(bind)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _parse_notary(value: str) -> NotaryServer | None:
    if not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(parts):
        raise ValueError("must be 'server_name,key_id,base64_public_key'")
    name, key_id, key = parts
    if not key_id.startswith("ed25519:"):
        raise ValueError(f"key ID {key_id!r} is not an ed25519 key")
    from warden.matrix.keys import decode_verify_key  # local: keys imports nothing of ours

    decode_verify_key(key_id, key)
    return NotaryServer(ServerName(name), KeyID(key_id), key)


@dataclass(frozen=True)
class OldVerifyKey:
    """One ``PS_OLD_VERIFY_KEYS`` entry: a retired federation key and when it retired."""

    key_id: KeyID
    verify_key_base64: str
    expired_ts: int  # ms since the epoch


def parse_old_verify_keys(value: str) -> list[OldVerifyKey]:
    """Parse ``ed25519:<id>=<base64 public key>@<expired_ts ms>,...``; raise ``ValueError``."""
    from warden.matrix.keys import POLICY_SERVER_KEY_ID, decode_verify_key

    out: dict[str, OldVerifyKey] = {}
    for item in _split_csv(value):
        key_id, eq, rest = item.partition("=")
        key, at, ts = rest.rpartition("@")
        key_id, key, ts = key_id.strip(), key.strip(), ts.strip()
        if not eq or not at or not key_id or not key or not ts.isdigit():
            raise ValueError(f"{item!r} is not 'ed25519:<id>=<base64 public key>@<expired_ts ms>'")
        if not key_id.startswith("ed25519:") or key_id == "ed25519:":
            raise ValueError(f"key ID {key_id!r} is not an ed25519 key")
        if key_id == POLICY_SERVER_KEY_ID:
            raise ValueError("the policy key must not be published as a server key")
        if key_id in out:
            raise ValueError(f"key ID {key_id!r} is listed twice")
        decode_verify_key(key_id, key)
        out[key_id] = OldVerifyKey(KeyID(key_id), key, int(ts))
    return list(out.values())


class SettingsError(SystemExit):
    """Raised (as an exit) when a setting is invalid; the message names the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment.

    On a bad value, print one line naming the ``PS_`` variable to stderr and exit with
    status 2.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        message = str(err["msg"]).removeprefix("Value error, ")
        line = f"warden: invalid setting {ENV_PREFIX}{field.upper()}: {message}"
        print(line, file=sys.stderr)
        raise SettingsError(2) from None
