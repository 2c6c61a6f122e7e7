"""Fixtures for filter and pipeline tests: real Redis and PostgreSQL behind the filters."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.filters.filter_helpers import OWN_USER
from warden.filters.base import FilterDeps


@pytest.fixture
def deps(redis_client: aioredis.Redis, pg_pool: asyncpg.Pool) -> FilterDeps:
    """What filters use, on the test Redis and database."""
    return FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
