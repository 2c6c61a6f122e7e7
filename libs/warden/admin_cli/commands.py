"""The ``warden admin`` subcommands: one handler per command, each returning its output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from warden.admin_cli.client import AdminClient, path_part
from warden.admin_cli.output import as_json, fields, table, timestamp

Handler = Callable[[AdminClient, argparse.Namespace], str]

COMMANDS: dict[str, Handler] = {}


class UsageError(Exception):
    """A command line the CLI cannot turn into a request (exit status 2)."""


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return register


# --- Communities -------------------------------------------------------------------


def _community_text(community: dict[str, Any]) -> str:
    config = community.get("config") or {}
    head = fields(
        [
            ("community", community.get("community_id")),
            ("name", community.get("name")),
            ("can self-join rooms", community.get("can_self_join_rooms")),
        ]
    )
    if not config:
        return f"{head}\nconfig: (no overrides: every key inherits the instance default)"
    rows = [[key, config[key]] for key in sorted(config)]
    return f"{head}\nconfig overrides:\n{table(['KEY', 'VALUE'], rows)}"


@_command("communities.create")
def communities_create(client: AdminClient, args: argparse.Namespace) -> str:
    """Create a community."""
    community = client.request("POST", "/communities/new", json={"name": args.name})
    return as_json(community) if args.json else _community_text(community)


@_command("communities.list")
def communities_list(client: AdminClient, args: argparse.Namespace) -> str:
    """List communities."""
    found = client.request("GET", "/communities")
    if args.json:
        return as_json(found)
    rows = [
        [
            c.get("community_id"),
            c.get("name"),
            c.get("can_self_join_rooms"),
            len(c.get("config") or {}),
        ]
        for c in found
    ]
    return table(["COMMUNITY", "NAME", "SELF-JOIN", "OVERRIDES"], rows)


@_command("communities.show")
def communities_show(client: AdminClient, args: argparse.Namespace) -> str:
    """Show one community and its config overrides."""
    community = client.request("GET", f"/communities/{path_part(args.community_id)}")
    return as_json(community) if args.json else _community_text(community)


def _config_value(text: str) -> Any:
    """``KEY=VALUE``'s value: JSON when it parses (numbers, booleans, lists), else text."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _config_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.from_file:
        try:
            data = orjson.loads(_read_input(args.from_file))
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"{args.from_file}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{args.from_file}: must hold a JSON object of config keys")
        changes.update(data)
    for item in args.pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{item!r} is not KEY=VALUE")
        changes[key.strip()] = _config_value(value)
    for key in args.unset:
        if args.replace:
            raise UsageError("--unset makes no sense with --replace (absent keys inherit)")
        changes[key] = None
    if not changes and not args.replace:
        raise UsageError("nothing to change: give KEY=VALUE pairs, --unset or --from-file")
    return changes


@_command("communities.set-config")
def communities_set_config(client: AdminClient, args: argparse.Namespace) -> str:
    """Change a community's config: merge keys in, or replace the whole config."""
    changes = _config_changes(args)
    community_path = f"/communities/{path_part(args.community_id)}"
    if args.replace:
        community = client.request("POST", f"{community_path}/config", json=changes)
    else:
        community = client.request("PATCH", community_path, json={"config": changes})
    return as_json(community) if args.json else _community_text(community)


@_command("communities.rotate-token")
def communities_rotate_token(client: AdminClient, args: argparse.Namespace) -> str:
    """Give the community a new access token; the old one stops working at once."""
    path = f"/communities/{path_part(args.community_id)}/rotate_access_token"
    answer = client.request("POST", path, json={})
    if args.json:
        return as_json(answer)
    # Warden stores only a hash, so it cannot show the old token; policyserv can.
    if answer.get("old_access_token"):
        old = f"{answer['old_access_token']} (now dead)"
    elif answer.get("had_access_token"):
        old = "revoked (not shown: only its hash was kept)"
    else:
        old = "(none)"
    return (
        fields([("new access token", answer.get("new_access_token")), ("old token", old)])
        + "\nThe new token is shown only this once: store it now."
    )


# --- Rooms -------------------------------------------------------------------------

_ROOM_HEADERS = ["ROOM", "VERSION", "COMMUNITY", "MODERATOR", "STATE LEARNED"]


def _room_row(room: dict[str, Any]) -> list[Any]:
    return [
        room.get("room_id"),
        room.get("room_version"),
        room.get("community_id"),
        room.get("moderator_user_id") or "-",
        timestamp(room.get("last_cached_state_timestamp")),
    ]


def _room_text(room: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("room", room.get("room_id")),
        ("version", room.get("room_version")),
        ("community", room.get("community_id")),
        ("moderator", room.get("moderator_user_id") or "-"),
        ("state learned", timestamp(room.get("last_cached_state_timestamp"))),
    ]
    policy = room.get("policy_server")
    if isinstance(policy, dict):
        pairs += [
            ("policy server named", policy.get("via")),
            ("names Warden", policy.get("uses_warden")),
            ("with Warden's key", policy.get("key_matches")),
        ]
    return fields(pairs)


@_command("rooms.protect")
def rooms_protect(client: AdminClient, args: argparse.Namespace) -> str:
    """Protect a room (or move it to another community) without joining it."""
    body = {"room_version": args.room_version, "community_id": args.community}
    room = client.request("PUT", f"/rooms/{path_part(args.room_id)}", json=body)
    return as_json(room) if args.json else _room_text(room)


@_command("rooms.join")
def rooms_join(client: AdminClient, args: argparse.Namespace) -> str:
    """Join a room over federation and protect it."""
    body: dict[str, Any] = {"community_id": args.community}
    if args.via:
        body["via"] = args.via
    room = client.request("POST", f"/rooms/{path_part(args.room_id)}/join", json=body)
    return as_json(room) if args.json else _room_text(room)


@_command("rooms.leave")
def rooms_leave(client: AdminClient, args: argparse.Namespace) -> str:
    """Leave a room over federation and stop protecting it."""
    body: dict[str, Any] = {"via": args.via} if args.via else {}
    answer = client.request("POST", f"/rooms/{path_part(args.room_id)}/leave", json=body)
    return as_json(answer) if args.json else f"left {args.room_id}; it is no longer protected"


@_command("rooms.list")
def rooms_list(client: AdminClient, args: argparse.Namespace) -> str:
    """List protected rooms."""
    found = client.request("GET", "/rooms")
    if args.json:
        return as_json(found)
    return table(_ROOM_HEADERS, [_room_row(r) for r in found])


@_command("rooms.show")
def rooms_show(client: AdminClient, args: argparse.Namespace) -> str:
    """Show a protected room and what its m.room.policy says of Warden."""
    room = client.request("GET", f"/rooms/{path_part(args.room_id)}")
    return as_json(room) if args.json else _room_text(room)


# --- Verdicts ----------------------------------------------------------------------

_OUTCOME = {"prohibited": "refused", "allowed": "signed", "neutral": "signed"}


@_command("verdict")
def verdict(client: AdminClient, args: argparse.Namespace) -> str:
    """Why an event was signed or refused: the verdict and every filter's outcome."""
    found = client.request("GET", f"/events/{path_part(args.event_id)}")
    if args.json:
        return as_json(found)
    content_class = str(found.get("class"))
    filters = found.get("filters") or []
    refused_by = [f.get("name") for f in filters if f.get("class") == "prohibited"]
    failed = [f.get("name") for f in filters if f.get("error")]
    head = fields(
        [
            ("event", found.get("event_id")),
            ("verdict", f"{content_class} ({_OUTCOME.get(content_class, '?')})"),
            ("harms", found.get("harms")),
            ("refused by", refused_by),
            ("filters failed", failed),
            ("room", found.get("room_id")),
            ("community", found.get("community_id")),
            ("sender", found.get("sender")),
            ("sender verified", found.get("sender_verified", True)),
            ("event type", found.get("event_type")),
            ("asked by", found.get("origin")),
            ("first seen", timestamp(found.get("first_seen_ts"))),
        ]
    )
    rows = [
        [
            f.get("name"),
            f.get("class"),
            f.get("harms"),
            f"{f.get('duration_ms', 0):.2f}",
            f.get("error"),
        ]
        for f in filters
    ]
    return f"{head}\nfilters:\n{table(['FILTER', 'RESULT', 'HARMS', 'MS', 'ERROR'], rows)}"


# --- Keyword templates -------------------------------------------------------------


def _read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None


@_command("templates.upload")
def templates_upload(client: AdminClient, args: argparse.Namespace) -> str:
    """Store a keyword template's text (the API compiles nothing at upload)."""
    text = _read_input(args.file)
    path = f"/keyword_templates/{path_part(args.name)}"
    answer = client.request("POST", path, content=text, content_type="text/plain; charset=utf-8")
    if args.json:
        return as_json(answer)
    body = str(answer.get("body", ""))
    return f"template {answer.get('name')!s}: stored {len(body.splitlines())} lines"


@_command("templates.show")
def templates_show(client: AdminClient, args: argparse.Namespace) -> str:
    """Print a keyword template's text."""
    answer = client.request("GET", f"/keyword_templates/{path_part(args.name)}")
    return as_json(answer) if args.json else str(answer.get("body", ""))


# --- The argument parser -----------------------------------------------------------


def add_commands(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add every ``warden admin`` subcommand; ``common`` holds the shared options."""
    groups = parser.add_subparsers(dest="admin_group", required=True, metavar="GROUP")

    def leaf(
        sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: str, text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(admin_handler=handler)
        return p

    communities = groups.add_parser("communities", help="create, list, show and configure")
    csub = communities.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    leaf(csub, "create", "communities.create", "create a community").add_argument("name")
    leaf(csub, "list", "communities.list", "list communities")
    leaf(csub, "show", "communities.show", "show a community").add_argument("community_id")
    setc = leaf(
        csub,
        "set-config",
        "communities.set-config",
        "change config keys (values are JSON, else text): merged, or --replace the whole config",
    )
    setc.add_argument("community_id")
    setc.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    setc.add_argument("--unset", action="append", default=[], metavar="KEY", help="inherit again")
    setc.add_argument("--from-file", metavar="FILE", help="a JSON object of keys ('-': stdin)")
    setc.add_argument(
        "--replace", action="store_true", help="replace the whole config (absent keys inherit)"
    )
    leaf(
        csub, "rotate-token", "communities.rotate-token", "give the community a new access token"
    ).add_argument("community_id")

    rooms = groups.add_parser("rooms", help="protect, join, leave, list and show rooms")
    rsub = rooms.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    protect = leaf(rsub, "protect", "rooms.protect", "protect a room without joining it")
    protect.add_argument("room_id")
    protect.add_argument("--community", required=True, help="community ID")
    protect.add_argument("--room-version", required=True, help='the room\'s version, e.g. "11"')
    join = leaf(rsub, "join", "rooms.join", "join a room over federation and protect it")
    join.add_argument("room_id")
    join.add_argument("--community", required=True, help="community ID")
    join.add_argument("--via", action="append", default=[], help="server to join through")
    leave = leaf(rsub, "leave", "rooms.leave", "leave a room and stop protecting it")
    leave.add_argument("room_id")
    leave.add_argument("--via", action="append", default=[], help="server to leave through")
    leaf(rsub, "list", "rooms.list", "list protected rooms")
    leaf(rsub, "show", "rooms.show", "show a protected room").add_argument("room_id")

    leaf(
        groups, "verdict", "verdict", "why an event was signed or refused (every filter)"
    ).add_argument("event_id")

    templates = groups.add_parser("templates", help="upload and show keyword templates")
    tsub = templates.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    upload = leaf(tsub, "upload", "templates.upload", "store a keyword template's text")
    upload.add_argument("name")
    upload.add_argument("file", help="file with the template text ('-': stdin)")
    leaf(tsub, "show", "templates.show", "print a keyword template").add_argument("name")
