"""Read a policyserv database (schema of its migration 18) into Warden's database.

The source is opened read-only (``default_transaction_read_only`` and a read-only,
repeatable-read transaction, so every table is read from one snapshot). Each source row
is compared with what Warden holds and counted as created, updated, unchanged or
skipped (with the reason); only created and updated rows are written, all in one
transaction on Warden's database, so a second run changes nothing and a failed run
leaves nothing half done. ``dry_run`` opens Warden's database read-only as well and
writes nothing.

What policyserv holds and Warden does not use is counted and reported as skipped.
Imported verdicts are marked published: they were judged long ago, and sending them to
the moderator and webhooks now would redact or report old events again. Room v1/v2
refusals are imported unbound (no reference hash; bound on first sight by the filter
workers, see ``verdicts``) and counted in ``verdicts_unbound``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from warden.matrix.room_versions import get_room_version
from warden.policy.verdict import ContentClass, FilterOutcome
from warden.policyserv_import.config import map_config
from warden.policyserv_import.templates import Untranslatable, translate
from warden.policyserv_import.verdicts import Unimportable, decode_event
from warden.storage.communities import hash_access_token

logger = logging.getLogger(__name__)

KINDS = (
    "communities",
    "rooms",
    "keyword_templates",
    "displaynames",
    "verdicts",
    "ban_rules",
    "trust_data",
    "media_classifications",
    "state_learn_queue",
    "destination_edus",
)
# Source columns the import reads, by table (migration 18's schema).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "communities": ("id", "name", "config", "api_access_token", "can_self_join_rooms"),
    "rooms": ("room_id", "room_version", "moderator_user_id", "community_id"),
    "events": ("event_id", "is_probably_spam", "confidence_vectors", "first_seen_ts"),
    "keyword_templates": ("name", "body"),
    "displaynames": ("room_id", "user_id", "displayname"),
    "ban_rules": ("room_id", "entity_type", "entity_id"),
    "trust_data": ("source_name", "key", "data"),
    "media_classifications": ("mxc_uri", "community_id", "classifications"),
    "state_learn_queue": ("room_id",),
    "destination_edus": ("destination",),
}
IMPORT_FILTER_NAME = "policyserv_import"
EVENT_BATCH = 1000
EXAMPLES_PER_REASON = 5

SKIP_BAN_RULES = (
    "Warden learns policy rules only from the verified state of the rooms in a "
    "community's policy_list_room_ids; these rows carry no event, sender or state to "
    "verify. Set policy_list_room_ids to the policy room (policyserv's "
    "PS_MJOLNIR_FILTER_ROOM_ID) and Warden learns its rules when it joins or refreshes it"
)
# Trust sources policyserv filled from room state it never verified; Warden derives the
# same facts from the state it verified.
ROOM_DERIVED_TRUST_SOURCES = frozenset({"power_levels", "creator"})
SKIP_TRUST_ROOM_DERIVED = (
    "derived from room state policyserv did not verify; Warden derives creators and "
    "power levels from the room state it verified"
)
SKIP_MEDIA_COMMUNITY = "its community is not imported"
SKIP_MEDIA_UNREADABLE = "no classification, or not an array of strings"
IMPORT_SOURCE = "policyserv_import"
SKIP_STATE_QUEUE = "a work queue of policyserv's state learning; Warden learns state itself"
SKIP_EDUS = (
    "policyserv's outgoing redaction-command EDU queue; Warden redacts through its "
    "moderator service"
)
SKIP_DISPLAYNAMES_LEARNED = (
    "Warden already learned this room's members itself; its own state stands"
)


class SourceError(Exception):
    """The source database is not a policyserv database Warden can read."""


class TargetError(Exception):
    """Warden's database is not ready for the import."""


@dataclass
class KindReport:
    """What happened to one kind of row."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    # reason -> (count, a few example IDs)
    reasons: dict[str, list[Any]] = field(default_factory=dict)

    def skip(self, reason: str, example: str, count: int = 1) -> None:
        """Count ``count`` rows skipped for ``reason``."""
        self.skipped += count
        entry = self.reasons.setdefault(reason, [0, []])
        entry[0] += count
        if len(entry[1]) < EXAMPLES_PER_REASON and example:
            entry[1].append(example)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "skipped_reasons": [
                {"reason": r, "count": c, "examples": ex} for r, (c, ex) in self.reasons.items()
            ],
        }


@dataclass
class ImportReport:
    """The whole import's outcome."""

    dry_run: bool
    kinds: dict[str, KindReport] = field(default_factory=lambda: {k: KindReport() for k in KINDS})
    # community ID -> [(key, reason)] for configuration keys not carried over
    config_dropped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    templates_disabled: list[tuple[str, str]] = field(default_factory=list)
    verdict_encodings: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Room v1/v2 refusals created unbound, bound to the first event asked about.
    verdicts_unbound: int = 0
    policy_rooms: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "dry_run": self.dry_run,
            "kinds": {k: r.to_dict() for k, r in self.kinds.items()},
            "config_keys_dropped": [
                {"community_id": c, "key": k, "reason": r}
                for c, items in self.config_dropped.items()
                for k, r in items
            ],
            "templates_disabled": [{"name": n, "reason": r} for n, r in self.templates_disabled],
            "verdict_encodings": dict(self.verdict_encodings),
            "verdicts_unbound": self.verdicts_unbound,
            "ban_rule_rooms": self.policy_rooms,
        }

    def render(self) -> str:
        """The human-readable summary."""
        lines = ["policyserv import" + (" (dry run: nothing was written)" if self.dry_run else "")]
        for kind, r in self.kinds.items():
            lines.append(
                f"  {kind}: {r.created} created, {r.updated} updated, {r.unchanged} unchanged,"
                f" {r.skipped} skipped"
            )
        if self.verdict_encodings:
            enc = ", ".join(f"{k} {v}" for k, v in sorted(self.verdict_encodings.items()))
            lines.append(f"  verdict encodings read: {enc}")
        if self.verdicts_unbound:
            lines.append(
                f"  room v1/v2 refusals imported unbound: {self.verdicts_unbound} (each is"
                " bound to the content of the first event asked about under its ID)"
            )
        skipped = [(k, r) for k, r in self.kinds.items() if r.reasons]
        if skipped:
            lines.append("skipped:")
            for kind, r in skipped:
                for reason, (count, examples) in r.reasons.items():
                    ex = f" (e.g. {', '.join(examples)})" if examples else ""
                    lines.append(f"  {kind}: {count}: {reason}{ex}")
        if self.policy_rooms:
            lines.append(f"  ban rules were learned from: {', '.join(self.policy_rooms)}")
        if self.config_dropped:
            lines.append("configuration keys not carried over:")
            for community, items in self.config_dropped.items():
                for key, reason in items:
                    lines.append(f"  {community}: {key}: {reason}")
        if self.templates_disabled:
            lines.append("keyword templates imported disabled (kept in original_body):")
            for name, reason in self.templates_disabled:
                lines.append(f"  {name}: {reason}")
        return "\n".join(lines)


async def _check_source(src: asyncpg.Connection) -> None:
    rows = await src.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
    )
    present: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        present[r["table_name"]].add(r["column_name"])
    missing = [
        f"{table}.{column}"
        for table, columns in REQUIRED_COLUMNS.items()
        for column in columns
        if column not in present.get(table, set())
    ]
    if missing:
        raise SourceError(
            "not a policyserv database at migration 18 or later (missing "
            + ", ".join(missing[:8])
            + ("..." if len(missing) > 8 else "")
            + ")"
        )


async def _check_target(dst: asyncpg.Connection) -> None:
    rows = await dst.fetch(
        "SELECT table_name, column_name, is_nullable FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
        " AND (table_name, column_name) IN (('verdicts', 'published'),"
        " ('keyword_templates', 'original_body'), ('communities', 'api_access_token_hash'),"
        " ('verdicts', 'reference_hash'))"
    )
    # Migration 0012 lets a room v1/v2 refusal be stored unbound.
    unbound_ok = any(
        r["column_name"] == "reference_hash" and r["is_nullable"] == "YES" for r in rows
    )
    if len(rows) != 4 or not unbound_ok:
        raise TargetError("Warden's database is not migrated: run `warden migrate` first")


class _Importer:
    def __init__(self, src: asyncpg.Connection, dst: asyncpg.Connection, dry_run: bool) -> None:
        self.src = src
        self.dst = dst
        self.dry_run = dry_run
        self.report = ImportReport(dry_run=dry_run)
        self.rooms: set[str] = set()

    async def _write(self, query: str, *args: Any) -> None:
        if not self.dry_run:
            await self.dst.execute(query, *args)

    async def communities(self) -> None:
        report = self.report.kinds["communities"]
        existing = {
            r["id"]: r
            for r in await self.dst.fetch(
                "SELECT id, name, config::text AS config, can_self_join_rooms,"
                " api_access_token_hash FROM communities"
            )
        }
        token_holders = {
            r["api_access_token_hash"]: r["id"]
            for r in existing.values()
            if r["api_access_token_hash"] is not None
        }
        for row in await self.src.fetch(
            "SELECT id, name, config::text AS config, api_access_token, can_self_join_rooms"
            " FROM communities ORDER BY id"
        ):
            config, dropped = map_config(orjson.loads(row["config"]) if row["config"] else {})
            if dropped:
                self.report.config_dropped[row["id"]] = dropped
            token = row["api_access_token"]
            token_hash = hash_access_token(token) if token else None
            holder = token_holders.get(token_hash) if token_hash else None
            if holder is not None and holder != row["id"]:
                # The hash is unique: the token cannot open two communities.
                dropped.append(
                    ("api_access_token", f"already the token of Warden community {holder}")
                )
                self.report.config_dropped[row["id"]] = dropped
                have_row = existing.get(row["id"])
                token_hash = None if have_row is None else have_row["api_access_token_hash"]
            if token_hash is not None:
                token_holders[token_hash] = row["id"]
            wanted = (row["name"], config, bool(row["can_self_join_rooms"]), token_hash)
            have = existing.get(row["id"])
            if have is not None and wanted == (
                have["name"],
                orjson.loads(have["config"]),
                have["can_self_join_rooms"],
                have["api_access_token_hash"],
            ):
                report.unchanged += 1
                continue
            await self._write(
                "INSERT INTO communities (id, name, config, can_self_join_rooms,"
                " api_access_token_hash) VALUES ($1, $2, $3::jsonb, $4, $5)"
                " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, config = EXCLUDED.config,"
                " can_self_join_rooms = EXCLUDED.can_self_join_rooms,"
                " api_access_token_hash = EXCLUDED.api_access_token_hash",
                row["id"],
                wanted[0],
                orjson.dumps(config).decode(),
                wanted[2],
                token_hash,
            )
            if have is None:
                report.created += 1
            else:
                report.updated += 1

    async def rooms_(self) -> None:
        report = self.report.kinds["rooms"]
        existing = {
            r["room_id"]: r
            for r in await self.dst.fetch(
                "SELECT room_id, room_version, community_id, moderator_user_id FROM rooms"
            )
        }
        for row in await self.src.fetch(
            "SELECT room_id, room_version, COALESCE(moderator_user_id, '') AS moderator,"
            " COALESCE(community_id, 'default') AS community_id FROM rooms ORDER BY room_id"
        ):
            room_id = row["room_id"]
            try:
                get_room_version(row["room_version"])
            except (KeyError, ValueError):
                report.skip(f"unknown room version {row['room_version']!r}", room_id)
                continue
            self.rooms.add(room_id)
            wanted = (row["room_version"], row["community_id"], row["moderator"])
            have = existing.get(room_id)
            if have is not None and wanted == (
                have["room_version"],
                have["community_id"],
                have["moderator_user_id"],
            ):
                report.unchanged += 1
                continue
            # last_state_update_ts stays Warden's: its own state learning decides.
            await self._write(
                "INSERT INTO rooms (room_id, room_version, community_id, moderator_user_id)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (room_id) DO UPDATE SET"
                " room_version = EXCLUDED.room_version, community_id = EXCLUDED.community_id,"
                " moderator_user_id = EXCLUDED.moderator_user_id",
                room_id,
                *wanted,
            )
            if have is None:
                report.created += 1
            else:
                report.updated += 1

    async def templates(self) -> None:
        report = self.report.kinds["keyword_templates"]
        existing = {
            r["name"]: tuple(r.values())[1:]
            for r in await self.dst.fetch(
                "SELECT name, body, enabled, original_body, disabled_reason FROM keyword_templates"
            )
        }
        for row in await self.src.fetch("SELECT name, body FROM keyword_templates ORDER BY name"):
            name, original = row["name"], row["body"] or ""
            if not original.strip():
                report.skip("empty: policyserv treats an empty template as deleted", name)
                continue
            try:
                wanted: tuple[Any, ...] = (translate(original), True, original, None)
            except Untranslatable as exc:
                reason = f"not translated mechanically: {exc}"
                wanted = ("", False, original, reason)
                self.report.templates_disabled.append((name, reason))
            have = existing.get(name)
            if have == wanted:
                report.unchanged += 1
                continue
            await self._write(
                "INSERT INTO keyword_templates (name, body, enabled, original_body,"
                " disabled_reason) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET"
                " body = EXCLUDED.body, enabled = EXCLUDED.enabled,"
                " original_body = EXCLUDED.original_body,"
                " disabled_reason = EXCLUDED.disabled_reason,"
                " updated_ts = (extract(epoch from now()) * 1000)::bigint",
                name,
                *wanted,
            )
            if have is None:
                report.created += 1
            else:
                report.updated += 1

    async def displaynames(self) -> None:
        report = self.report.kinds["displaynames"]
        by_room: dict[str, dict[str, str]] = defaultdict(dict)
        for row in await self.src.fetch(
            "SELECT room_id, user_id, displayname FROM displaynames ORDER BY room_id, user_id"
        ):
            if row["room_id"] not in self.rooms:
                report.skip("its room is not imported", row["room_id"])
            elif not _is_user_id(row["user_id"]):
                report.skip("not a user ID", row["user_id"][:64])
            else:
                by_room[row["room_id"]][row["user_id"]] = row["displayname"]
        for room_id, names in by_room.items():
            have = {
                r["user_id"]: r["displayname"]
                for r in await self.dst.fetch(
                    "SELECT user_id, displayname FROM displaynames WHERE room_id = $1", room_id
                )
            }
            if have == names:
                report.unchanged += len(names)
            elif have:
                report.skip(SKIP_DISPLAYNAMES_LEARNED, room_id, len(names))
            else:
                if not self.dry_run:
                    await self.dst.executemany(
                        "INSERT INTO displaynames (room_id, user_id, displayname)"
                        " VALUES ($1, $2, $3)",
                        [(room_id, u, n) for u, n in names.items()],
                    )
                report.created += len(names)

    async def verdicts(self) -> None:
        report = self.report.kinds["verdicts"]
        batch: list[asyncpg.Record] = []
        async for row in self.src.cursor(
            "SELECT event_id, is_probably_spam, confidence_vectors,"
            " (extract(epoch from first_seen_ts) * 1000)::bigint AS first_seen_ts"
            " FROM events ORDER BY event_id",
            prefetch=EVENT_BATCH,
        ):
            batch.append(row)
            if len(batch) >= EVENT_BATCH:
                await self._verdict_batch(report, batch)
                batch = []
        if batch:
            await self._verdict_batch(report, batch)

    async def _verdict_batch(self, report: KindReport, rows: list[asyncpg.Record]) -> None:
        decoded = []
        for row in rows:
            try:
                v = decode_event(
                    row["event_id"], row["is_probably_spam"], row["confidence_vectors"]
                )
            except Unimportable as exc:
                report.skip(str(exc), row["event_id"][:80])
                continue
            self.report.verdict_encodings[v.encoding] += 1
            decoded.append((v, row["first_seen_ts"] or 0))
        if not decoded:
            return
        existing = {
            r["event_id"]: r
            for r in await self.dst.fetch(
                "SELECT event_id, class, harms, reference_hash FROM verdicts"
                " WHERE event_id = ANY($1::text[])",
                [v.event_id for v, _ in decoded],
            )
        }
        new = []
        for v, ts in decoded:
            have = existing.get(v.event_id)
            if have is None:
                new.append((v, ts))
            elif (have["class"], tuple(have["harms"])) == (
                int(v.content_class),
                v.harms,
            ) and (
                # An unbound refusal may have been bound on first sight since.
                v.reference_hash is None or have["reference_hash"] == v.reference_hash
            ):
                report.unchanged += 1
            else:
                report.skip(
                    "Warden already judged this event differently; a verdict never changes,"
                    " so Warden's stands",
                    v.event_id,
                )
        if not new:
            return
        if not self.dry_run:
            await self.dst.execute(
                """
                INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class,
                    harms, filters, sender, event_type, origin, first_seen_ts, published)
                SELECT v.event_id, '', '', v.reference_hash, v.class,
                    ARRAY(SELECT jsonb_array_elements_text(v.harms)), v.filters, '', '', '',
                    v.first_seen_ts, TRUE
                FROM jsonb_to_recordset($1::jsonb) AS v(event_id text, reference_hash text,
                    class smallint, harms jsonb, filters jsonb, first_seen_ts bigint)
                ON CONFLICT (event_id) DO NOTHING
                """,
                orjson.dumps(
                    [
                        {
                            "event_id": v.event_id,
                            "reference_hash": v.reference_hash,
                            "class": int(v.content_class),
                            "harms": list(v.harms),
                            "filters": [_outcome(v.content_class, v.harms, v.reasons)],
                            "first_seen_ts": ts,
                        }
                        for v, ts in new
                    ]
                ).decode(),
            )
        report.created += len(new)
        self.report.verdicts_unbound += sum(v.reference_hash is None for v, _ in new)

    async def media_classifications(self) -> None:
        """Scan results per (media, community); policyserv's JSON array is the class
        then the harms, or (its oldest form) only harms, which meant prohibited."""
        report = self.report.kinds["media_classifications"]
        communities = {r["id"] for r in await self.dst.fetch("SELECT id FROM communities")}
        have = {
            (r["mxc_uri"], r["community_id"]): (r["class"], list(r["harms"]))
            for r in await self.dst.fetch(
                "SELECT mxc_uri, community_id, class, harms FROM media_classifications"
            )
        }
        new: list[tuple[str, str, int, list[str]]] = []
        for row in await self.src.fetch(
            "SELECT mxc_uri, community_id, classifications::text AS c"
            " FROM media_classifications ORDER BY mxc_uri, community_id"
        ):
            key = (row["mxc_uri"], row["community_id"])
            if row["community_id"] not in communities:
                report.skip(SKIP_MEDIA_COMMUNITY, row["community_id"])
                continue
            decoded = decode_media_classification(row["c"])
            if decoded is None:
                report.skip(SKIP_MEDIA_UNREADABLE, row["mxc_uri"][:80])
                continue
            if key in have:
                # A result Warden has (imported or its own) stands.
                report.unchanged += 1
                continue
            new.append((*key, int(decoded[0]), list(decoded[1])))
        if new and not self.dry_run:
            now = int(time.time() * 1000)
            await self.dst.executemany(
                "INSERT INTO media_classifications"
                " (mxc_uri, community_id, class, harms, source, classified_ts)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                [(*n, IMPORT_SOURCE, now) for n in new],
            )
        report.created += len(new)

    async def trust_data(self) -> None:
        """Trust sources not derived from room state (a Muninn Hall directory, say)."""
        report = self.report.kinds["trust_data"]
        have = {
            (r["source_name"], r["key"]): r["data"]
            for r in await self.dst.fetch(
                "SELECT source_name, key, data::text AS data FROM trust_data"
            )
        }
        for row in await self.src.fetch(
            "SELECT source_name, key, data::text AS data FROM trust_data ORDER BY source_name, key"
        ):
            key = (row["source_name"], row["key"])
            if row["source_name"] in ROOM_DERIVED_TRUST_SOURCES:
                report.skip(SKIP_TRUST_ROOM_DERIVED, f"{key[0]}/{key[1]}"[:80])
                continue
            data = orjson.loads(row["data"])
            if key in have:
                if orjson.loads(have[key]) == data:
                    report.unchanged += 1
                    continue
                report.updated += 1
            else:
                report.created += 1
            await self._write(
                "INSERT INTO trust_data (source_name, key, data, updated_ts)"
                " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (source_name, key)"
                " DO UPDATE SET data = EXCLUDED.data, updated_ts = EXCLUDED.updated_ts",
                key[0],
                key[1],
                orjson.dumps(data).decode(),
                int(time.time() * 1000),
            )

    async def skipped_tables(self) -> None:
        for kind, table, reason in (
            ("ban_rules", "ban_rules", SKIP_BAN_RULES),
            ("state_learn_queue", "state_learn_queue", SKIP_STATE_QUEUE),
            ("destination_edus", "destination_edus", SKIP_EDUS),
        ):
            # The table names are the constants above, never input.
            count = await self.src.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
            if count:
                self.report.kinds[kind].skip(reason, "", count)
        self.report.policy_rooms = [
            r["room_id"]
            for r in await self.src.fetch(
                "SELECT DISTINCT room_id FROM ban_rules ORDER BY room_id LIMIT 20"
            )
        ]


def _outcome(content_class: Any, harms: tuple[str, ...], reasons: tuple[str, ...]) -> Any:
    outcome = FilterOutcome(IMPORT_FILTER_NAME, content_class, harms).to_dict()
    if reasons:
        # policyserv's legacy reasons and vectors, for whoever asks why.
        outcome["policyserv_reasons"] = list(reasons)
    return outcome


def _is_user_id(user_id: str) -> bool:
    local, sep, server = user_id[1:].partition(":")
    return user_id.startswith("@") and bool(local) and bool(sep) and bool(server)


async def run_import(source_url: str, target_url: str, *, dry_run: bool) -> ImportReport:
    """Import the policyserv database at ``source_url`` into Warden's at ``target_url``.

    Raises ``SourceError``/``TargetError`` when either database is not as expected,
    and asyncpg or OS errors when one cannot be reached.
    """
    read_only = {"default_transaction_read_only": "on"}
    src = await asyncpg.connect(source_url, timeout=10, server_settings=read_only)
    try:
        dst = await asyncpg.connect(
            target_url, timeout=10, server_settings=read_only if dry_run else None
        )
        try:
            async with src.transaction(isolation="repeatable_read", readonly=True):
                await _check_source(src)
                await _check_target(dst)
                importer = _Importer(src, dst, dry_run)
                async with dst.transaction(readonly=dry_run):
                    await importer.communities()
                    await importer.rooms_()
                    await importer.templates()
                    await importer.displaynames()
                    await importer.verdicts()
                    await importer.media_classifications()
                    await importer.trust_data()
                    await importer.skipped_tables()
            return importer.report
        finally:
            await dst.close()
    finally:
        await src.close()


def decode_media_classification(text: str | None) -> tuple[ContentClass, tuple[str, ...]] | None:
    """policyserv's ``classifications``: ``[class, harm...]``, or harms only (prohibited)."""
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    classes = {c.name.lower(): c for c in ContentClass}
    if value and value[0].lower() in classes:
        return classes[value[0].lower()], tuple(value[1:])
    if not value:
        return None
    return ContentClass.PROHIBITED, tuple(value)
