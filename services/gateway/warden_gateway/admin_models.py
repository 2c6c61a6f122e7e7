"""Request and response bodies of the admin API (``/api/v1``), as pydantic models.

Field names follow policyserv's API so its tooling (policyserv-setup-bot) keeps working.
The models exist for validation and for the OpenAPI document; community configuration
values are checked by ``warden.policy.config.validate_community_config``, the single
source of truth for config keys, and only *described* here (``config_json_schema``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from warden.policy.config import KeyType, known_keys

# policyserv's error message promises 3-255 characters (its comparisons actually allow
# 4-254); Warden enforces what the message says, counted after trimming whitespace.
COMMUNITY_NAME_MIN = 3
COMMUNITY_NAME_MAX = 255

CommunityName = Annotated[
    str,
    StringConstraints(
        strict=True,
        strip_whitespace=True,
        min_length=COMMUNITY_NAME_MIN,
        max_length=COMMUNITY_NAME_MAX,
    ),
]

_JSON_TYPES: dict[KeyType, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "list[str]": {"type": "array", "items": {"type": "string"}},
    "object": {"type": "object"},
}


def config_json_schema(*, nullable_values: bool = False) -> dict[str, Any]:
    """JSON schema of a community config: every key a community may set, typed and documented.

    Built from the declared keys when the OpenAPI document is generated, so it lists every
    filter's keys. ``nullable_values`` allows ``null`` (PATCH's "remove this override").
    """
    properties: dict[str, Any] = {}
    for key in sorted(known_keys().values(), key=lambda k: k.name):
        if key.instance_only:
            continue
        prop = dict(_JSON_TYPES[key.type])
        if nullable_values:
            prop = {"anyOf": [prop, {"type": "null"}]}
        properties[key.name] = {**prop, "description": key.doc, "default": key.default}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _document_config(schema: dict[str, Any]) -> None:
    schema.update(config_json_schema())


def _document_config_patch(schema: dict[str, Any]) -> None:
    schema.update(config_json_schema(nullable_values=True))


# A config object in a request or response body: validated by validate_community_config,
# documented with the declared keys.
ConfigBody = Annotated[dict[str, Any], Field(json_schema_extra=_document_config)]
ConfigPatchBody = Annotated[dict[str, Any], Field(json_schema_extra=_document_config_patch)]


class _Request(BaseModel):
    # Unknown top-level fields are ignored, as in policyserv: clients may send back a
    # whole object they fetched (with its community_id) as a PATCH.
    model_config = ConfigDict(extra="ignore")


class MatrixErrorBody(BaseModel):
    """Every error: a Matrix error code and a human-readable message."""

    errcode: str = Field(examples=["M_NOT_FOUND"])
    error: str = Field(examples=["Unknown community"])


class Community(BaseModel):
    """A community: its rooms share one configuration layered over the instance's."""

    community_id: str
    name: str
    config: ConfigBody = Field(
        description="The community's overrides of the instance defaults; absent keys inherit."
    )
    can_self_join_rooms: bool


class CommunityWriteAnswer(Community):
    """A community as a config write left it, with warnings when there is any."""

    warnings: list[str] | None = Field(
        default=None,
        description=(
            "Present when the request set keys that are accepted but ignored (legacy "
            "keys of policyserv's removed score model, such as spam_threshold)."
        ),
    )


class NewCommunityRequest(_Request):
    """Body of ``POST /api/v1/communities/new``."""

    name: CommunityName = Field(
        description=(
            f"Trimmed; {COMMUNITY_NAME_MIN} to {COMMUNITY_NAME_MAX} characters after trimming."
        )
    )


class CommunityPatch(_Request):
    """Body of ``PATCH /api/v1/communities/{community_id}``: only the given fields change.

    ``config`` is a JSON merge patch (RFC 7386) over the stored config: a key with a value
    replaces the stored override, a key with ``null`` removes it (the instance default
    applies again), absent keys are kept.
    """

    name: CommunityName | None = None
    config: ConfigPatchBody | None = None
    can_self_join_rooms: StrictBool | None = None


class Room(BaseModel):
    """A protected room."""

    room_id: str
    room_version: str
    moderator_user_id: str = Field(description='Who redacts in this room; "" when unset.')
    last_cached_state_timestamp: int = Field(
        description="When the room's state was last learned (ms since the epoch); 0 never."
    )
    community_id: str


class ProtectRoomRequest(_Request):
    """Body of ``PUT /api/v1/rooms/{room_id}``."""

    room_version: Annotated[str, StringConstraints(strict=True)] = Field(examples=["11"])
    community_id: Annotated[str, StringConstraints(strict=True)] = Field(examples=["default"])


class SetRoomModeratorRequest(_Request):
    """Body (and response) of ``POST /api/v1/set_room_moderator``."""

    room_id: Annotated[str, StringConstraints(strict=True)]
    moderator_user_id: Annotated[str, StringConstraints(strict=True)] = Field(
        description='A user ID, or "" to unset.'
    )


class FilterOutcome(BaseModel):
    """What one filter said about the event."""

    name: str
    content_class: str = Field(alias="class", description="neutral, allowed or prohibited")
    harms: list[str]
    duration_ms: float
    error: str | None = Field(
        default=None, description="Present when the filter failed or timed out."
    )
    dry_run: bool | None = Field(
        default=None,
        description="Present (true) when the community runs this filter in dry run "
        "(dry_run_filters): recorded, but it counted towards nothing.",
    )

    model_config = ConfigDict(populate_by_name=True)


class Verdict(BaseModel):
    """The stored verdict for an event, with every filter's outcome."""

    event_id: str
    content_class: str = Field(alias="class", description="neutral, allowed or prohibited")
    harms: list[str]
    filters: list[FilterOutcome]
    room_id: str
    community_id: str
    sender: str
    event_type: str
    origin: str = Field(description="The server whose request caused the evaluation.")
    reference_hash: str
    first_seen_ts: int
    sender_verified: bool = Field(
        default=True,
        description="False when nothing proved the sender sent the event (a third-party "
        "invite their server did not sign): it was judged without hellban, frequency "
        "count or redaction.",
    )
    extra: dict[str, Any] | None = None

    model_config = ConfigDict(populate_by_name=True)


class EmptyBody(BaseModel):
    """``{}``."""


ServerNameList = Annotated[
    list[Annotated[str, StringConstraints(strict=True)]], Field(max_length=20)
]


class JoinRoomRequest(_Request):
    """Body of ``POST /api/v1/rooms/{room_id}/join``."""

    community_id: Annotated[str, StringConstraints(strict=True)] = Field(examples=["default"])
    via: ServerNameList | None = Field(
        default=None,
        description="Resident servers to join through, in order (default: PS_JOIN_SERVER); "
        "the room ID's server part is tried after them.",
        examples=[["matrix.org"]],
    )


class LeaveRoomRequest(_Request):
    """Body of ``POST /api/v1/rooms/{room_id}/leave`` (optional)."""

    via: ServerNameList | None = Field(
        default=None,
        description="Servers to leave through first; then those remembered from the join, "
        "PS_JOIN_SERVER and the room ID's server part.",
    )


class ApproveInviteRequest(_Request):
    """Body of ``POST /api/v1/rooms/{room_id}/approve_invite``."""

    community_id: Annotated[str, StringConstraints(strict=True)] = Field(examples=["default"])


class InviteApproval(BaseModel):
    """Invites to this room are accepted, and the room joins this community."""

    room_id: str
    community_id: str
    created_ts: int = Field(description="When the approval was given (ms since the epoch).")


class PolicyServerInfo(BaseModel):
    """What the room's learned ``m.room.policy`` (state key "") says about Warden."""

    uses_warden: bool = Field(description="`via` is this server's name.")
    via: str | None = Field(description="The policy server the room names; null if none known.")
    public_key: str | None = Field(description="`public_keys.ed25519` of the event, or null.")
    key_matches: bool = Field(
        description="The room names Warden with Warden's current policy key: homeservers "
        "accept Warden's signatures."
    )


class RoomDetail(Room):
    """A protected room with its learned policy server state."""

    policy_server: PolicyServerInfo


class RotatedAccessToken(BaseModel):
    """Answer of ``POST /api/v1/communities/{community_id}/rotate_access_token``."""

    old_access_token: str = Field(
        description='Always "": Warden stores only a hash of tokens, so the old one cannot '
        "be shown (policyserv shows it). It stopped working when this answer was made."
    )
    new_access_token: str = Field(
        description="The new token (pst_ + 256 random bits). Shown only here, once: "
        "Warden keeps only its SHA-256."
    )
    had_access_token: bool = Field(
        description="Whether the community had a token before (now revoked)."
    )


class DeletedCommunity(BaseModel):
    """Answer of ``DELETE /api/v1/communities/{community_id}``."""

    moved_room_ids: list[str] = Field(
        description="The rooms moved to the move_rooms_to community (empty without rooms)."
    )
