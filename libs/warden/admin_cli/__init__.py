"""``warden admin``: the admin API (``/api/v1``) from the command line.

The CLI is a client like any other: it talks HTTP to a running gateway with the
``PS_API_KEY`` bearer key, so it works against a remote instance as well as a local
one. Answers are printed as readable tables, or as the API's JSON with ``--json``.
An error is one line on stderr, ``warden admin: <errcode>: <message> (HTTP <status>)``,
and the exit status is 1 (2 for usage errors, as argparse).
"""

from __future__ import annotations

import argparse
import os
import sys

from warden.admin_cli.client import KEY_ENV, URL_ENV, AdminClient, AdminError, default_url
from warden.admin_cli.commands import COMMANDS, UsageError, add_commands

__all__ = ["add_arguments", "run"]


def _add_common_options(parent: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--url, --timeout and --json; accepted before and after the subcommand.

    Only the ``admin`` level sets defaults: a subcommand's own default would overwrite a
    value given before it.
    """
    suppress = argparse.SUPPRESS
    parent.add_argument(
        "--url",
        default=None if defaults else suppress,
        help=f"base URL of the admin API (default: ${URL_ENV}, else PS_ADMIN_HTTP_BIND or "
        "PS_HTTP_BIND on loopback)",
    )
    parent.add_argument(
        "--timeout",
        type=float,
        default=60.0 if defaults else suppress,
        help="seconds to wait for an answer (default 60; joins can take long)",
    )
    parent.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else suppress,
        help="print the API's JSON answer instead of a table",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``admin`` subcommands to ``parser`` (the ``warden admin`` parser)."""
    _add_common_options(parser, defaults=True)
    leaf_options = argparse.ArgumentParser(add_help=False)
    _add_common_options(leaf_options, defaults=False)
    add_commands(parser, leaf_options)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``warden admin`` command; return the exit status."""
    api_key = os.environ.get(KEY_ENV, "")
    if not api_key:
        print(f"warden admin: {KEY_ENV} is not set (the admin API's key)", file=sys.stderr)
        return 2
    url = args.url or default_url()
    handler = COMMANDS[args.admin_handler]
    try:
        with AdminClient(url, api_key, timeout=args.timeout) as client:
            output = handler(client, args)
    except AdminError as exc:
        print(f"warden admin: {exc.line()}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"warden admin: {exc}", file=sys.stderr)
        return 2
    if output:
        print(output)
    return 0
