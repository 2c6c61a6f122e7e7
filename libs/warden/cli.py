"""The ``warden`` command: run a service, migrate the database, make keys, run the stack.

Services are found through the ``warden.services`` entry points, so this shared package
never imports a service package.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from warden.settings import Settings, load_settings
from warden.storage.database import DATABASE_ERRORS

SERVICES = ("gateway", "filter-worker", "moderator", "webhooks")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("warden")
    except PackageNotFoundError:  # running from a checkout without an install
        return "unknown"


def _service_entry(name: str) -> Callable[[Settings], int]:
    for ep in entry_points(group="warden.services"):
        if ep.name == name:
            fn: Callable[[Settings], int] = ep.load()
            return fn
    raise SystemExit(f"warden: service {name!r} is not installed")


def _cmd_migrate(settings: Settings, show_status: bool = False) -> int:
    import asyncpg

    from warden.storage.migrations import migrate, status

    async def go() -> int:
        conn = await asyncpg.connect(settings.database, timeout=10)
        try:
            if show_status:
                rows = await status(conn)
                for mig, applied_at in rows:
                    print(f"{mig.version:04d}  {mig.name:<40} {applied_at or 'pending'}")
                # Exit 3 when migrations are pending, so a script can wait on it.
                return 3 if any(at is None for _, at in rows) else 0
            applied = await migrate(conn)
            print(f"applied migrations: {applied}" if applied else "database is up to date")
            return 0
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except DATABASE_ERRORS as exc:
        print(f"warden migrate: cannot reach PS_DATABASE: {exc}", file=sys.stderr)
        return 1


def _cmd_keygen(settings: Settings, args: argparse.Namespace) -> int:
    from warden.matrix.keys import (
        KeyFileError,
        check_distinct,
        ensure_key,
        key_id_of,
        verify_key_base64,
    )

    if args.kubernetes_secret:
        from warden.kubernetes_key_secret import run as run_key_secret

        if args.rotate or args.federation_key or args.policy_key:
            print(
                "warden keygen: --kubernetes-secret writes no files and rotates nothing",
                file=sys.stderr,
            )
            return 2
        labels = {}
        for item in args.label:
            label, sep, value = item.partition("=")
            if not sep or not label:
                print(f"warden keygen: --label {item!r} is not KEY=VALUE", file=sys.stderr)
                return 2
            labels[label] = value
        return run_key_secret(
            args.kubernetes_secret,
            namespace=args.namespace,
            labels=labels,
            api_url=args.kubernetes_api,
            service_account_dir=args.service_account_dir,
        )
    fed_path = args.federation_key or settings.homeserver_signing_key_path
    pol_path = args.policy_key or settings.homeserver_event_signing_key_path
    if args.rotate:
        from warden.key_rotation import print_rotation

        return print_rotation(args.rotate, fed_path, pol_path, settings.old_verify_keys)
    try:
        fed, fed_new = ensure_key(fed_path)
        pol, pol_new = ensure_key(pol_path)
        check_distinct(fed, pol)
    except KeyFileError as exc:
        print(f"warden keygen: {exc}", file=sys.stderr)
        return 1
    for label, path, key, new in (
        ("federation key", fed_path, fed, fed_new),
        ("policy key", pol_path, pol, pol_new),
    ):
        state = "created" if new else "exists"
        print(f"{label}: {path} ({state}) {key_id_of(key)} {verify_key_base64(key)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="warden",
        description="Warden, a Matrix policy server. Settings come from PS_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"warden {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service in the foreground")
    migrate_cmd = sub.add_parser("migrate", help="apply pending database migrations")
    migrate_cmd.add_argument(
        "--status",
        action="store_true",
        help="list every migration and when it was applied; exit 3 if any is pending",
    )
    keygen = sub.add_parser(
        "keygen", help="write the federation and policy signing keys if they are missing"
    )
    keygen.add_argument("--federation-key", help="path (default PS_HOMESERVER_SIGNING_KEY_PATH)")
    keygen.add_argument("--policy-key", help="path (default PS_HOMESERVER_EVENT_SIGNING_KEY_PATH)")
    keygen.add_argument(
        "--rotate",
        choices=("federation", "policy"),
        help="replace that existing key with a new one (the old file is kept as "
        "<path>.<version>.retired) and print what to do next (docs/operator-guide.md: Keys)",
    )
    from warden.kubernetes_key_secret import SERVICE_ACCOUNT_DIR

    keygen.add_argument(
        "--kubernetes-secret",
        metavar="NAME",
        help="instead of files: create the Kubernetes Secret NAME holding both keys "
        "(signing.key, event_signing.key) as this pod's service account; an existing "
        "Secret is never changed (the Helm chart's key hook)",
    )
    keygen.add_argument(
        "--namespace", help="the Secret's namespace (default: the service account's)"
    )
    keygen.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label of the Secret"
    )
    keygen.add_argument(
        "--kubernetes-api",
        metavar="URL",
        help="the API server (default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)",
    )
    keygen.add_argument(
        "--service-account-dir",
        default=SERVICE_ACCOUNT_DIR,
        help="where the service account's token, ca.crt and namespace are",
    )
    sub.add_parser("dev", help="run the whole stack locally (embedded servers where needed)")
    sub.add_parser(
        "prune",
        help="prune old verdict details, deliveries and left rooms' state once (PS_RETENTION_*)",
    )
    check = sub.add_parser(
        "check-config",
        help="validate every setting and key file and reach each dependency; exit 1 on any problem",
    )
    check.add_argument("--offline", action="store_true", help="skip PostgreSQL, Redis and NATS")
    from warden.dev.sign_request import add_arguments as sign_request_arguments

    sign_request_arguments(
        sub.add_parser(
            "sign-request", help="ask a policy server to sign an event, as a test origin (dev)"
        )
    )
    from warden.policyserv_import.command import add_arguments as import_arguments

    import_arguments(
        sub.add_parser("import-policyserv", help="import a policyserv database into PS_DATABASE")
    )
    from warden.admin_cli import add_arguments as admin_arguments

    admin_arguments(
        sub.add_parser("admin", help="use the admin API (PS_API_KEY): communities, rooms, verdicts")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``warden`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        # Before load_settings, which stops at the first bad value: this lists them all.
        from warden.config_check import run as run_check

        return run_check(offline=args.offline)
    if args.command == "admin":
        # A client of a (maybe remote) gateway: this machine's settings do not matter.
        from warden.admin_cli import run as run_admin

        return run_admin(args)
    settings = load_settings()
    if args.command in SERVICES:
        # Filter defaults come from PS_<KEY> variables declared by the filters; a bad
        # one stops any service at start with one line, like a bad setting.
        from warden.policy.config import ConfigError, instance_defaults

        try:
            instance_defaults()
        except ConfigError as exc:
            print(f"warden: invalid setting {exc.key}: {exc.message}", file=sys.stderr)
            return 2
        return _service_entry(args.command)(settings)
    if args.command == "migrate":
        return _cmd_migrate(settings, show_status=args.status)
    if args.command == "keygen":
        return _cmd_keygen(settings, args)
    if args.command == "prune":
        from warden.retention import run_command as run_prune

        return run_prune(settings)
    if args.command == "dev":
        from warden.dev.stack import run_dev

        return run_dev(settings)
    if args.command == "sign-request":
        from warden.dev.sign_request import run as run_sign_request

        return run_sign_request(args)
    if args.command == "import-policyserv":
        from warden.policyserv_import.command import run as run_import

        return run_import(settings, args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
