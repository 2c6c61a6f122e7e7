"""Hypothesis strategies for JSON values and Matrix events in every room version.

Events are built to be accepted by Synapse's event parser (so it can serve as the
oracle) while covering what the redaction rules single out: every special event type,
the content keys each keeps, ``unsigned``, legacy top-level keys and random extras.
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from warden.matrix.canonical_json import MAX_SAFE_INT, MIN_SAFE_INT

ALL_VERSIONS = [str(n) for n in range(1, 13)]

# Characters that tend to break JSON encoders: controls, DEL, quotes, backslash,
# line/paragraph separators, BOM, noncharacters, combining marks and astral symbols.
AWKWARD_CHARS = [
    "\x00",
    "\x1f",
    "\x7f",
    '"',
    "\\",
    "/",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\u0301",
    "\u200d",
    "\U0001f600",
    "\U0010ffff",
    "\U0001d11e",
    "é",
    "\n",
    "\t",
]

chars = st.one_of(
    st.characters(codec="utf-8"),  # every code point but surrogates
    st.sampled_from(AWKWARD_CHARS),
)
text = st.text(alphabet=chars, max_size=12)

safe_ints = st.one_of(
    st.integers(min_value=MIN_SAFE_INT, max_value=MAX_SAFE_INT),
    st.sampled_from([MIN_SAFE_INT, MAX_SAFE_INT, 0, -1, 1, MIN_SAFE_INT + 1, MAX_SAFE_INT - 1]),
)

json_scalars = st.one_of(st.none(), st.booleans(), safe_ints, text)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(text, children, max_size=4),
    ),
    max_leaves=12,
)

json_objects = st.dictionaries(text, json_values, max_size=4)

server_names = st.sampled_from(["example.org", "other.example", "s.test:8448", "[::1]:8448"])
localparts = st.text(
    alphabet=string.ascii_lowercase + string.digits + "._=-/", min_size=1, max_size=8
)


@st.composite
def user_ids(draw: st.DrawFn) -> str:
    return f"@{draw(localparts)}:{draw(server_names)}"


@st.composite
def hash_ids(draw: st.DrawFn, sigil: str) -> str:
    body = draw(
        st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=43, max_size=43)
    )
    return sigil + body


@st.composite
def legacy_event_ids(draw: st.DrawFn) -> str:
    return f"${draw(localparts)}:{draw(server_names)}"


SPECIAL_TYPES = [
    "m.room.member",
    "m.room.create",
    "m.room.join_rules",
    "m.room.power_levels",
    "m.room.history_visibility",
    "m.room.aliases",
    "m.room.redaction",
]


@st.composite
def special_content(draw: st.DrawFn, event_type: str, version: str) -> dict[str, Any]:
    """Content holding (some of) the keys the redaction rules treat specially."""
    content: dict[str, Any] = {}

    def maybe(key: str, strategy: st.SearchStrategy[Any]) -> None:
        if draw(st.booleans()):
            content[key] = draw(strategy)

    if event_type == "m.room.member":
        content["membership"] = draw(st.sampled_from(["join", "invite", "leave", "ban", "knock"]))
        maybe("join_authorised_via_users_server", user_ids())
        maybe(
            "third_party_invite",
            st.one_of(
                st.fixed_dictionaries(
                    {"signed": json_objects, "display_name": text},
                    optional={"extra": json_values},
                ),
                st.fixed_dictionaries({"display_name": text}),
                json_scalars,
            ),
        )
        maybe("displayname", text)
        maybe("avatar_url", text)
    elif event_type == "m.room.create":
        maybe("creator", user_ids())
        content["room_version"] = version
        maybe("m.federate", st.booleans())
        maybe("predecessor", json_objects)
        maybe("additional_creators", st.lists(user_ids(), max_size=2))
        maybe("type", text)
    elif event_type == "m.room.join_rules":
        content["join_rule"] = draw(
            st.sampled_from(["public", "invite", "knock", "restricted", "knock_restricted"])
        )
        maybe("allow", st.lists(json_objects, max_size=2))
    elif event_type == "m.room.power_levels":
        ints_or_str = st.one_of(safe_ints, text)
        for key in ("ban", "kick", "redact", "invite", "events_default", "state_default"):
            maybe(key, ints_or_str)
        maybe("users_default", ints_or_str)
        maybe("events", st.dictionaries(text, ints_or_str, max_size=3))
        maybe("users", st.dictionaries(user_ids(), ints_or_str, max_size=3))
        maybe("notifications", st.dictionaries(text, ints_or_str, max_size=2))
    elif event_type == "m.room.history_visibility":
        content["history_visibility"] = draw(
            st.sampled_from(["world_readable", "shared", "invited", "joined"])
        )
    elif event_type == "m.room.aliases":
        maybe("aliases", st.lists(text, max_size=3))
    elif event_type == "m.room.redaction":
        maybe("redacts", hash_ids("$"))
        maybe("reason", text)
    # Random extra keys that every rule must drop (or, for v11+ create, keep).
    extra = draw(json_objects)
    for k, v in extra.items():
        content.setdefault(k, v)
    return content


_RESERVED_TOP_LEVEL = frozenset(
    {
        "age_ts",
        "outlier",
        "destinations",
        "event_id",
        "state_key",
        "redacts",
        "room_id",
        "prev_events",
        "auth_events",
        "unsigned",
        "origin",
        "membership",
        "prev_state",
    }
)


@st.composite
def events(draw: st.DrawFn, version: str) -> dict[str, Any]:
    """A full PDU for room ``version``, with hashes and signatures placeholders."""
    n = int(version)
    # Weighted towards the types with special redaction rules; None means a random type.
    picked = draw(st.sampled_from([*SPECIAL_TYPES, "m.room.member", "m.room.message", None]))
    event_type = draw(text) if picked is None else picked
    is_create = event_type == "m.room.create"
    content = draw(special_content(event_type, version))
    event: dict[str, Any] = {
        "type": event_type,
        "sender": draw(user_ids()),
        "content": content,
        "depth": draw(st.integers(min_value=0, max_value=MAX_SAFE_INT)),
        "origin_server_ts": draw(st.integers(min_value=0, max_value=MAX_SAFE_INT)),
        "hashes": {"sha256": draw(hash_ids(""))},
        "signatures": {},
    }
    if is_create or draw(st.booleans()):
        event["state_key"] = "" if is_create else draw(st.one_of(text, user_ids()))
    if n >= 12:
        if not is_create:
            event["room_id"] = draw(hash_ids("!"))
    else:
        event["room_id"] = f"!{draw(localparts)}:{draw(server_names)}"
    ref: st.SearchStrategy[Any]
    if n <= 2:
        event["event_id"] = draw(legacy_event_ids())
        ref = st.tuples(legacy_event_ids(), st.fixed_dictionaries({"sha256": hash_ids("")})).map(
            list
        )
    else:
        ref = hash_ids("$")
    event["prev_events"] = draw(st.lists(ref, max_size=3))
    event["auth_events"] = draw(st.lists(ref, max_size=3))
    if draw(st.booleans()):
        event["unsigned"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "age_ts": safe_ints,
                    "age": safe_ints,
                    "replaces_state": hash_ids("$"),
                    "prev_content": json_objects,
                    "random": json_values,
                },
            )
        )
    # Legacy top-level keys (kept by v1-v10 redaction) and random extras.
    if draw(st.booleans()):
        event["origin"] = draw(server_names)
    if draw(st.booleans()):
        event["membership"] = draw(st.sampled_from(["join", "leave"]))
    if draw(st.booleans()):
        event["prev_state"] = []
    if event_type == "m.room.redaction" and draw(st.booleans()):
        event["redacts"] = draw(hash_ids("$"))
    # Synapse strips top-level age_ts/outlier/destinations before the content hash
    # (legacy internal keys; the spec does not): keep them out of the oracle tests.
    extras = draw(st.dictionaries(text, json_values, max_size=3))
    for k, v in extras.items():
        if k not in _RESERVED_TOP_LEVEL:
            event.setdefault(k, v)
    return event


@st.composite
def versioned_events(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A room version identifier and an event for it."""
    version = draw(st.sampled_from(ALL_VERSIONS))
    return version, draw(events(version))
