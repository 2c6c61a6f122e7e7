"""Telling a dependency failure from a filter bug, and what the pipeline raises for it.

A filter that fails because something it depends on failed or was slow (PostgreSQL,
Redis, the network, a classifier service) says nothing about the event: judging it again
a moment later may well succeed. Such a failure must never become the event's verdict
(verdicts are forever, and a refusal is redacted and reported), so the pipeline gives up
on the evaluation (``EvaluationUnavailable``) and the event is judged again on the next
ask (the gateway answers 503 with ``Retry-After`` meanwhile, which a homeserver treats
as "not signed": sending fails closed).

Anything else a filter raises is a bug in the filter (or an input it cannot handle); it
keeps the ``<name>_fail_secure`` semantics: a refusal (``other``) or neutral, remembered
like any verdict, because judging again would fail the same way.

What counts as a dependency failure:

- ``DependencyUnavailable``, which a filter raises to say so itself (a classifier that
  answered 503, a breaker that is open);
- ``TimeoutError`` (the filter timeout of a filter that waits on I/O, a pool or socket
  timeout), ``OSError`` (refused or reset connections, DNS), but not the file-system
  errors (a missing file or a permission is a deployment bug, not a passing outage);
- Redis: connection, timeout, loading, read-only, OOM, cluster-down and "try again"
  errors (not the ``ResponseError`` of a bad command or script, nor ``DataError``);
- PostgreSQL: asyncpg's interface errors (connection closed, pool closing) and server
  errors of SQLSTATE classes 08 (connection), 40 (deadlock, serialisation), 53
  (insufficient resources, too many connections), 57 (query cancelled, shutdown), 58
  (system error) and ``55P03`` (lock not available); not syntax, data or constraint
  errors (classes 22, 23, 42, ...), which are bugs.
"""

from __future__ import annotations

import asyncpg
import redis.exceptions as redis_errors

# SQLSTATE classes (first two characters) that say the database could not serve us now.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_SQLSTATES = frozenset({"55P03"})  # lock_not_available (lock_timeout)

_TRANSIENT_REDIS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
)
# OSErrors that say something is wrong with the deployment, not that a peer is slow.
_FILE_SYSTEM_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
# Replies Redis gives when it cannot serve a command now (redis-py may raise them as a
# plain ResponseError, e.g. from inside a script or a pipeline).
_TRANSIENT_REDIS_REPLIES = ("OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN")


class DependencyUnavailable(Exception):
    """Raised by a filter when a service it depends on failed or answered too late."""


class EvaluationUnavailable(Exception):
    """The pipeline gave up on an event because a filter's dependency failed.

    Nothing about the event may be stored, cached or published: it is judged again on
    the next ask.
    """

    def __init__(self, filter_name: str, error: str) -> None:
        super().__init__(f"filter {filter_name} could not run: {error}")
        self.filter_name = filter_name
        self.error = error


def is_dependency_failure(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency failed or was slow, not that the code is wrong."""
    if isinstance(exc, DependencyUnavailable | TimeoutError):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _FILE_SYSTEM_ERRORS)
    if isinstance(exc, redis_errors.RedisError):
        if isinstance(exc, _TRANSIENT_REDIS):
            return True
        return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(
            _TRANSIENT_REDIS_REPLIES
        )
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True  # connection closed, lost or cut by the server; pool closing
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
    return False
