"""Errors raised by the keyring.

Kept apart from ``keyring.py`` so that ``xmatrix`` (imported by the federation client)
can catch them without importing the keyring and its dependencies.
"""

from __future__ import annotations


class KeyringError(Exception):
    """A verify key could not be provided; the message says why."""


class KeyNotFound(KeyringError):
    """No such key is known for the server, even after fetching (or fetching failed)."""


class KeyExpired(KeyringError):
    """The key is known but was not valid at the time asked about."""
