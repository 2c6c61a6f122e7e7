"""The filter plugin API: what a filter declares, what it sees, and what it returns.

A filter is a subclass of ``Filter`` in a module of its own under ``warden.filters``,
listed in ``warden.filters.registry``. Next to its code it declares:

* ``name`` — short and stable: it labels metrics, names the filter in verdicts and
  gives the community key ``<name>_fail_secure`` (declared automatically, see
  ``declare_fail_secure``);
* ``group`` — where it runs in the pipeline (``Group``);
* ``harm_ids`` — every harm ID it can emit;
* its configuration keys (``warden.policy.config.declare``);
* ``enabled(config)`` — whether the community's configuration turns it on (a function
  of the configuration alone: the pipeline remembers the answer per configuration);
* ``async check(ctx) -> FilterResult``;
* ``waits_on_io`` (and, for a filter that awaits I/O for a few events only,
  ``waits_on_io_sometimes`` with ``waits_for(ctx)``), which decides whether the pipeline
  gives a run a timer and a task of its own.

A filter that acts on the verdict (the hellban postfilter's ban) starts the write with
``ctx.start_effect`` rather than awaiting it: the verdict does not wait for the write,
and whoever asked for the verdict waits for it before answering (``Pipeline.evaluate``).

Filters are stateless: one instance serves every event and community. Shared state
(hellbans, rate windows) lives in Redis so every worker sees the same thing. Filters send
their Redis commands through ``FilterDeps.auto_pipeline``: the commands of all events
under evaluation at once then share one round trip.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from warden.filters.hellban_store import HellbanStore
from warden.matrix.canonical_json import encode_canonical_json
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.keyword_template_cache import KeywordTemplateCache
from warden.policy.verdict import ContentClass, FilterOutcome
from warden.storage.displaynames import get_displaynames
from warden.storage.redis_autopipeline import RedisAutoPipeline

if TYPE_CHECKING:
    from warden.media_scan.scanner import MediaScanner
    from warden.openai_moderation import OpenAIModeration
    from warden.trust.muninn import MuninnDirectoryCache
    from warden.trust.sources import RoomTrustCache

logger = logging.getLogger(__name__)

FAIL_SECURE_SUFFIX = "_fail_secure"

# Effects in flight (``FilterContext.start_effect``), referenced until they finish.
_EFFECTS_RUNNING: set[asyncio.Task[None]] = set()
EFFECT_FAILURES = Counter(
    "warden_filter_effect_failures_total",
    "Side effects a filter started for a verdict (a hellban's write) that raised, by filter; "
    "the verdict stands. A Redis outage is not one: the hellban store falls back to memory.",
    ["filter"],
)


class Group(enum.IntEnum):
    """Pipeline groups, run in this order (policyserv's set groups)."""

    PREFILTER = 0  # always runs
    HELLBAN_PREFILTER = 1  # runs while the class is neutral
    MAIN = 2  # runs while the class is neutral
    POSTFILTER = 3  # runs when the class is prohibited


@dataclass(frozen=True)
class FilterResult:
    """One filter's judgement: a class and the harm IDs behind it."""

    content_class: ContentClass = ContentClass.NEUTRAL
    harms: tuple[str, ...] = ()

    @classmethod
    def neutral(cls) -> FilterResult:
        """No opinion."""
        return _NEUTRAL

    @classmethod
    def allowed(cls) -> FilterResult:
        """Explicitly fine: skips the later groups (prefilters only)."""
        return _ALLOWED

    @classmethod
    def prohibited(cls, *harms: str) -> FilterResult:
        """Refuse, for these harms (``other`` is added by normalisation when none)."""
        return cls(ContentClass.PROHIBITED, tuple(harms))


_NEUTRAL = FilterResult()
_ALLOWED = FilterResult(ContentClass.ALLOWED)


class DisplaynameCache:
    """Learned display names per room, cached briefly in process.

    The mentions filter needs them for every message; they change only when state is
    learned again, so a few seconds of staleness is harmless and saves a query per event.
    One read per room at a time: the events of a batch in a room whose names expired all
    ask at once (fifty, in a spam wave in one room), and each used to read every member's
    name itself.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = 10.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, dict[str, str]]] = {}
        # The read in flight per room; at most one per room, dropped when it ends.
        self._loading: dict[str, asyncio.Task[dict[str, str]]] = {}
        self.reads = 0  # PostgreSQL reads made (for tests)

    def fresh(self, room_id: str) -> bool:
        """Whether ``get(room_id)`` would answer from memory (without a query)."""
        hit = self._entries.get(room_id)
        return hit is not None and hit[0] > time.monotonic()

    async def get(self, room_id: str) -> dict[str, str]:
        """user ID → display name for the room's learned joined members."""
        hit = self._entries.get(room_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        loading = self._loading.get(room_id)
        if loading is None:
            loading = asyncio.create_task(self._load(room_id))
            self._loading[room_id] = loading
            loading.add_done_callback(self._loaded)
        # Shielded: a waiter given up on (its filter's timeout) leaves the read to others.
        return await asyncio.shield(loading)

    async def _load(self, room_id: str) -> dict[str, str]:
        try:
            self.reads += 1
            names = await get_displaynames(self._pool, room_id)
            if len(self._entries) > 10_000:  # bound memory; entries are cheap to reload
                self._entries.clear()
            self._entries[room_id] = (time.monotonic() + self._ttl, names)
            return names
        finally:
            self._loading.pop(room_id, None)

    @staticmethod
    def _loaded(task: asyncio.Task[dict[str, str]]) -> None:
        # Every waiter may have been cancelled: retrieve a failure so that it is not
        # reported as never retrieved (each waiter that was still there raised it).
        if not task.cancelled():
            task.exception()


@dataclass
class FilterDeps:
    """What filters may use besides the event: shared stores and our identity.

    ``auto_pipeline`` sends ``redis`` commands issued in the same loop iteration as one
    pipeline; filters use it rather than ``redis`` for their per-event commands.
    """

    redis: aioredis.Redis
    pool: asyncpg.Pool
    local_user_id: str  # @<PS_JOIN_LOCALPART>:<PS_HOMESERVER_NAME>
    displaynames: DisplaynameCache = field(init=False)
    auto_pipeline: RedisAutoPipeline = field(init=False)
    displayname_ttl_seconds: float = 10.0
    # Compiled keyword templates; the worker subscribes it to template changes.
    keyword_templates: KeywordTemplateCache = field(init=False)
    # Trust sources of the untrusted-media filter (read only for media events).
    muninn: MuninnDirectoryCache = field(init=False)
    room_trust: RoomTrustCache = field(init=False)
    # The moderation service client of the openai_filter filter (None: no API key set).
    openai_moderation: OpenAIModeration | None = None
    # The HMA media scanner (None when PS_HMA_API_URL is not set).
    media_scanner: MediaScanner | None = None
    # The hellban filters' bans (Redis, or this process while Redis is down).
    hellbans: HellbanStore = field(init=False)

    def __post_init__(self) -> None:
        # Imported here: warden.trust uses filter modules, which import this one.
        from warden.trust.muninn import MuninnDirectoryCache
        from warden.trust.sources import RoomTrustCache

        self.muninn = MuninnDirectoryCache(self.pool)
        self.room_trust = RoomTrustCache(self.pool)
        self.displaynames = DisplaynameCache(self.pool, self.displayname_ttl_seconds)
        self.keyword_templates = KeywordTemplateCache(self.pool)
        self.auto_pipeline = RedisAutoPipeline(self.redis)
        self.hellbans = HellbanStore(self.auto_pipeline)


@dataclass
class FilterContext:
    """One event under evaluation, as every filter sees it."""

    # The PDU as its hashes and signatures cover it (validated by the gateway; without
    # ``unsigned`` and ``signatures``, which anyone relaying it can change).
    event: dict[str, Any]
    event_id: str
    room_id: str
    community_id: str
    config: EffectiveConfig
    deps: FilterDeps
    room_version: str = ""
    now_ms: int = 0
    # Outcomes of the groups that already ran (the postfilter looks at them).
    earlier: list[FilterOutcome] = field(default_factory=list)
    # False when nothing proved that ``sender`` sent the event (a third-party invite
    # without the sender's server's signature). Filters then change nothing about the
    # sender (no hellban, no frequency count) and trust nothing about them (no allow
    # list); what only refuses the event (a hellban or a policy list ban) still applies.
    sender_verified: bool = True
    # True while a filter the community runs in dry run is checking: its outcome will not
    # count, so it must not act (set a hellban) either.
    dry_run: bool = False
    # The sender's server's signatures as received (key ID → unpadded base64), for the
    # unsafe signing key filter only: no hash covers them, so nothing else may look.
    sender_signatures: dict[str, Any] = field(default_factory=dict)
    # True when the gateway checked those signatures before asking (``/sign`` and
    # ``/check``): at least one verified under a key the sender's server publishes, and
    # none under a key the keyring holds failed (the keyring never holds a compromised
    # key). The unsafe signing key filter then has nothing to look for in a single one.
    sender_signatures_checked: bool = False
    # Whether the sender serves a hellban in the community, when the caller read it with
    # its own Redis round trip (the filter worker's look-up script); None: the hellban
    # prefilter reads it.
    hellbanned: bool | None = None
    # Side effects of the verdict that filters started without waiting for them
    # (``start_effect``); ``Pipeline.evaluate`` waits for them, or hands them to its caller.
    effects: list[asyncio.Task[None]] = field(default_factory=list)

    def start_effect(self, filter_name: str, effect: Coroutine[Any, Any, None]) -> None:
        """Start ``effect`` (a write that acts on the verdict, such as a hellban) and go on.

        The filter's outcome does not wait for it, so the verdict is not held up by the
        write's round trip; ``Pipeline.evaluate``'s caller waits for it before the
        verdict is answered (the filter worker: during the verdict's commit). A failure
        is logged, not raised: the verdict it acts on is decided already. An effect is
        not cancelled with the evaluation that started it.
        """
        task = asyncio.ensure_future(_run_effect(filter_name, self.event_id, effect))
        _EFFECTS_RUNNING.add(task)
        task.add_done_callback(_EFFECTS_RUNNING.discard)
        self.effects.append(task)

    @property
    def event_type(self) -> str:
        """The event's ``type`` ("" if absent or not a string)."""
        t = self.event.get("type")
        return t if isinstance(t, str) else ""

    @property
    def sender(self) -> str:
        """The event's ``sender`` ("" if absent or not a string)."""
        s = self.event.get("sender")
        return s if isinstance(s, str) else ""

    @property
    def is_state(self) -> bool:
        """True when the event has a ``state_key`` (even an empty one)."""
        return self.event.get("state_key") is not None

    @property
    def content(self) -> dict[str, Any]:
        """The event's ``content`` object ({} when missing or not an object)."""
        c = self.event.get("content")
        return c if isinstance(c, dict) else {}

    @cached_property
    def content_json(self) -> str:
        """``content`` as canonical JSON text: what keyword and ``@`` counts search.

        Canonical, not the bytes as received, so every worker sees the same text whatever
        whitespace or escaping the sending server used.
        """
        return _canonical_text(self.content)

    @cached_property
    def event_json(self) -> str:
        """The whole event as canonical JSON text."""
        return self.event_json_bytes.decode("utf-8")

    @cached_property
    def event_json_bytes(self) -> bytes:
        """The whole event as canonical JSON, UTF-8: for its length, with no text made."""
        return _canonical_bytes(self.event)

    def string_field(self, key: str) -> str:
        """A string field of ``content`` ("" when absent or not a string)."""
        value = self.content.get(key)
        return value if isinstance(value, str) else ""


async def _run_effect(filter_name: str, event_id: str, effect: Coroutine[Any, Any, None]) -> None:
    try:
        await effect
    except Exception as exc:
        EFFECT_FAILURES.labels(filter_name).inc()
        logger.warning(
            "filter effect failed",
            extra={
                "filter": filter_name,
                "event_id": event_id,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )


def _canonical_text(value: Any) -> str:
    return _canonical_bytes(value).decode("utf-8")


def _canonical_bytes(value: Any) -> bytes:
    try:
        return encode_canonical_json(value)
    except ValueError:
        # Not representable canonically (the gateway validates PDUs, so only direct
        # callers reach this); fall back to plain JSON rather than failing the filter.
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def fail_secure_key_name(filter_name: str) -> str:
    """``<name>_fail_secure``."""
    return filter_name + FAIL_SECURE_SUFFIX


def declare_fail_secure(filter_name: str) -> ConfigKey:
    """Declare the filter's ``<name>_fail_secure`` community key (default true)."""
    key = ConfigKey(
        fail_secure_key_name(filter_name),
        "bool",
        True,
        f"When the {filter_name} filter fails or times out: true counts the event as "
        "prohibited (harm org.matrix.msc4456.other); false counts it as neutral.",
    )
    declare(key)
    return key


class Filter(abc.ABC):
    """Base class of every filter. Subclasses set the class attributes below."""

    name: ClassVar[str]
    group: ClassVar[Group] = Group.MAIN
    harm_ids: ClassVar[tuple[str, ...]] = ()
    fail_secure_key: ClassVar[ConfigKey]
    # False for a filter whose ``check`` never awaits I/O (it only computes): the
    # pipeline then runs it in the evaluation's own task instead of a task of its own.
    waits_on_io: ClassVar[bool] = True
    # True for a filter (``waits_on_io`` False) that awaits I/O for a few events only:
    # ``waits_for(ctx)`` names them, and the pipeline treats those as an I/O filter's
    # (a timer, a task of their own) while running the rest inline.
    waits_on_io_sometimes: ClassVar[bool] = False
    # True for a filter that judges text alone (an event's body): the server-centric
    # API's text check (``/_policyserv/v1/check/text``) runs exactly these.
    checks_text: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every concrete filter gets its fail-secure switch, declared with its own keys.
        if "name" in cls.__dict__:
            cls.fail_secure_key = declare_fail_secure(cls.name)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """Whether the community's configuration turns this filter on."""
        return True

    def waits_for(self, ctx: FilterContext) -> bool:
        """Whether ``check`` may await I/O for this event (cheap: asked per event of a
        ``waits_on_io_sometimes`` filter)."""
        return self.waits_on_io

    def timeout_seconds(self, deps: FilterDeps, default: float) -> float:
        """This filter's timeout: the pipeline's ``default`` unless the filter needs its own
        (one waiting on a slow outside service, like media scanning)."""
        return default

    @classmethod
    def fail_secure(cls, config: EffectiveConfig) -> bool:
        """Whether a failure of this filter counts as prohibited for this community."""
        key = cls.fail_secure_key
        # A filter declared after the instance defaults were read (tests) has no layered
        # value yet; its code default applies.
        return bool(config.get(key.name, key.default))

    @abc.abstractmethod
    async def check(self, ctx: FilterContext) -> FilterResult:
        """Judge one event."""
