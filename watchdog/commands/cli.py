"""The `pg-watchdog` command line: parse arguments, dispatch, turn user errors into one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from watchdog import __version__
from watchdog.audit.log import AuditError
from watchdog.config.policy import Config, config_path, load_config
from watchdog.config.yamlpos import ConfigError
from watchdog.pg.connect import TargetError
from watchdog.text.escape import OneLineFormatter, log_text

log = logging.getLogger("watchdog")

EXIT_OK, EXIT_TARGET, EXIT_CONFIG = 0, 1, 2


class UserError(Exception):
    """An error the user can fix; printed as one line with an exit code."""

    def __init__(self, message: str, code: int = EXIT_TARGET) -> None:
        super().__init__(message)
        self.code = code


def setup_logging(level: int) -> None:
    """One line per event on stderr; no timestamps when the journal adds its own."""
    under_systemd = "JOURNAL_STREAM" in os.environ or "NOTIFY_SOCKET" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_systemd:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    # Names and messages from servers are escaped here, once for every call site.
    handler.setFormatter(OneLineFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if level > logging.DEBUG:
        # APScheduler logs two INFO lines per job run: thousands a day per target.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(config_path(args.config))
    from watchdog.service.preflight import PreflightError, require

    try:
        require(config)
    except PreflightError as exc:
        raise UserError(str(exc), EXIT_CONFIG) from None
    return config


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"{config.source}: ok ({len(config.targets)} targets, {len(config.policies)} policies"
        f"{', dry run' if config.dry_run else ''})"
    )
    from watchdog.core.unreachable import never_acts

    for line in never_acts(config):
        print(f"pg-watchdog: warning: {line}", file=sys.stderr)
    if not args.connect:
        return EXIT_OK
    from watchdog.commands.check import check_targets

    return asyncio.run(check_targets(config))


def _cmd_once(args: argparse.Namespace) -> int:
    from watchdog.commands.once import run_once

    code, report = asyncio.run(run_once(_load(args), dry_run=args.dry_run, as_json=args.json))
    try:
        sys.stdout.write(report)
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()  # all was done and alerted: only the report has no reader; same code
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from watchdog.service.scheduler import run_service

    config = _load(args)
    return asyncio.run(run_service(config, config_path(args.config), dry_run=args.dry_run))


def _cmd_status(args: argparse.Namespace) -> int:
    from watchdog.commands.status import run_status

    return asyncio.run(run_status(_load(args), args))


def _cmd_audit(args: argparse.Namespace) -> int:
    from watchdog.commands import audit as audit_command

    def audit_path(path: str | None) -> Path:
        return load_config(config_path(path)).audit.path

    return audit_command.run(args, audit_path)


def _cmd_advise(args: argparse.Namespace) -> int:
    from watchdog.commands.advise.command import run_advise

    return run_advise(_load(args), args)


def _cmd_init(args: argparse.Namespace) -> int:
    from watchdog.commands.init.command import run_init

    return run_init(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from watchdog.commands.demo.command import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="pg-watchdog",
        description="Self-healing watchdog for PostgreSQL connection exhaustion.",
    )
    parser.add_argument("--version", action="version", version=f"pg-watchdog {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="policy file (default: $PG_WATCHDOG_CONFIG, then /etc/pg-watchdog/policies.yaml)",
        )
        return p

    p = command("run", "the service: sweep every target on schedule until SIGTERM")
    p.add_argument("--dry-run", action="store_true", help="decide and record, never signal")
    p.set_defaults(func=_cmd_run, log_level=logging.INFO)

    p = command("once", "one sweep of every target now; print what was done")
    p.add_argument("--dry-run", action="store_true", help="decide and record, never signal")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_once, log_level=logging.WARNING)

    p = command("check", "validate the policy file (and, with --connect, each target)")
    p.add_argument("--connect", action="store_true", help="also reach each target and check it")
    p.set_defaults(func=_cmd_check, log_level=logging.WARNING)

    p = command("status", "the connection picture of each target")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--explain", action="store_true", help="every session and the rule for it")
    p.set_defaults(func=_cmd_status, log_level=logging.WARNING)

    p = command("audit", "review the termination audit log")
    try:
        from watchdog.commands import audit as audit_command

        audit_command.configure_parser(p)
    except ImportError:  # pragma: no cover - during development only
        pass
    p.set_defaults(func=_cmd_audit, log_level=logging.WARNING)

    p = command("advise", "from the audit log and a live look: the leak, and the fix to paste")
    from watchdog.commands.advise.command import configure_parser as configure_advise

    configure_advise(p)
    p.set_defaults(func=_cmd_advise, log_level=logging.WARNING)

    p = sub.add_parser("init", help="look at a server; write a policy file fitted to it (dry run)")
    from watchdog.commands.init.command import configure_parser as configure_init

    configure_init(p)
    p.set_defaults(func=_cmd_init, log_level=logging.WARNING, config=None)

    p = sub.add_parser("demo", help="reproduce a connection-exhaustion incident and heal it")
    p.add_argument("--major", type=int, default=18, help="PostgreSQL major to run (default 18)")
    p.add_argument("--fast", action="store_true", help="shorter thresholds (for tests)")
    p.set_defaults(func=_cmd_demo, log_level=logging.WARNING, config=None)
    return parser


def _reader_gone() -> None:
    """stdout's reader went away (`| head -1`): send the rest, and the exit flush, nowhere."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pg-watchdog` and `python -m watchdog`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # `pg-watchdog --help | head -1`
        _reader_gone()
        return EXIT_OK
    except SystemExit:
        _flush_stdout()
        raise
    setup_logging(logging.DEBUG if args.verbose else args.log_level)
    try:
        return _dispatch(args)
    finally:
        # Commands print into a buffer: a closed pipe shows up here, or at the exit flush.
        _flush_stdout()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        # The reader is gone. Every command writes its records and sends its alerts before it
        # prints (see once.py), so nothing is left undone but output nobody reads.
        _reader_gone()
        return EXIT_OK
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except UserError as exc:
        print(f"pg-watchdog: {log_text(str(exc))}", file=sys.stderr)
        return exc.code
    except (TargetError, AuditError) as exc:
        # A server's or pooler's words may be in it: one line, escaped, as in the log.
        print(f"pg-watchdog: {log_text(str(exc))}", file=sys.stderr)
        return EXIT_TARGET
    except KeyboardInterrupt:
        return 130
    return code
