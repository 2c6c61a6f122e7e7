"""The ``warden import-policyserv`` subcommand."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from warden.policyserv_import.importer import SourceError, TargetError, run_import
from warden.settings import Settings
from warden.storage.database import DATABASE_ERRORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options."""
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="POSTGRES_URL",
        help="policyserv's database (opened read-only)",
    )
    parser.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Import into ``PS_DATABASE``; print the report. 0 on success."""
    try:
        report = asyncio.run(run_import(args.source, settings.database, dry_run=args.dry_run))
    except (SourceError, TargetError) as exc:
        print(f"warden import-policyserv: {exc}", file=sys.stderr)
        return 2
    except DATABASE_ERRORS as exc:
        print(f"warden import-policyserv: database error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0
