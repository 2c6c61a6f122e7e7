"""New community IDs: unguessable, and never read as a command-line option."""

from __future__ import annotations

import pytest

from warden.storage import communities
from warden.storage.communities import new_community_id


def test_new_community_ids_never_start_with_a_dash() -> None:
    # One URL-safe ID in 64 started with "-": over 3,000 draws, about 47 would.
    ids = {new_community_id() for _ in range(3000)}
    assert len(ids) == 3000
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 24 for i in ids)


def test_an_id_starting_with_a_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["-starts-with-a-dash-xxxx", "Nodash-in-front-yyyyyyyy"])
    monkeypatch.setattr(communities.secrets, "token_urlsafe", lambda n: next(drawn))
    assert new_community_id() == "Nodash-in-front-yyyyyyyy"
