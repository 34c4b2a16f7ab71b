"""`pg-watchdog init --connect DSN`: look at a server for a few seconds, write a commented
policy file fitted to it, dry run on, never a secret in it.

Exit 0 written, 1 the server cannot be reached or the file cannot be written, 2 bad arguments
(or a file that exists, without --force).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from watchdog.commands.init.dsn import without_secrets
from watchdog.commands.init.fit import tools
from watchdog.commands.init.look import Facts, take_look
from watchdog.commands.init.render import Options, render
from watchdog.config import conninfo
from watchdog.config.policy import MIN_INTERVAL, Target, parse_config
from watchdog.config.units import parse_duration
from watchdog.config.units import policy_duration as duration
from watchdog.config.yamlpos import ConfigError, load_yaml
from watchdog.pg.connect import scrub
from watchdog.text.errors import reason as error_reason
from watchdog.text.fit import fit

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_AUDIT = "/var/log/pg-watchdog/audit.jsonl"


class InitError(Exception):
    """A problem the user can fix, with its exit code; the message is safe to print."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the `init` command's options to ``p``."""
    p.add_argument("--connect", metavar="DSN", required=True,
                   help="the server to look at: a libpq URI or key=value string, as in a target")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the file here (default: print it); an existing file needs --force")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--target-name", default="main", metavar="NAME",
                   help="the target's name in the file (default: main)")
    p.add_argument("--idle", metavar="DURATION",
                   help="threshold of the idle policy (default 10m, or under idle_session_timeout)")
    p.add_argument("--idle-in-transaction", metavar="DURATION",
                   help="threshold of the idle-in-transaction policy (default 5m, or under the"
                        " server's idle_in_transaction_session_timeout and transaction_timeout)")
    p.add_argument("--interval", default="5s", metavar="DURATION",
                   help="how often the service looks (default 5s)")
    p.add_argument("--audit-path", default=DEFAULT_AUDIT, metavar="PATH",
                   help=f"the audit log (default {DEFAULT_AUDIT})")
    p.add_argument("--look", default="3s", metavar="DURATION",
                   help="how long to watch the server before writing (default 3s)")


def _duration(flag: str, text: str | None, least: float = 0.0) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InitError(f"{flag}: {exc}") from None
    if seconds <= least:
        raise InitError(f"{flag}: {text!r} must be more than {duration(least) if least else 0}")
    return seconds


def _check_args(args: argparse.Namespace) -> None:
    if not _NAME.fullmatch(args.target_name):
        raise InitError(f"--target-name: {args.target_name!r} is not a valid name"
                        " (letters, digits, '_', '.', '-')")
    interval = _duration("--interval", args.interval) or 0.0
    if interval < MIN_INTERVAL:
        raise InitError(f"--interval: {args.interval!r} is too short (at least 250ms)")
    if args.output and os.path.lexists(args.output) and not args.force:
        raise InitError(f"{args.output} exists; use --force to replace it")


def _validate(text: str, path: str, facts: Facts) -> None:
    """The file must be one `check` accepts, dry run on, sparing what init meant to spare."""
    config = parse_config(load_yaml(text, path, {}), path)
    want = tuple(t.glob for t in tools(facts)[0])
    if not config.dry_run or config.exclude.applications != want:
        raise ConfigError(path, 1, 1, "", "the written file does not say what init meant")


def _write(path: Path, text: str, force: bool) -> None:
    """Create ``path`` (0640), never through a symlink; with ``force`` replace it whole."""
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if force else path
    fd = os.open(target, flags, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    os.close(fd)
    if force:
        try:
            os.replace(target, path)  # replaces a symlink itself, never what it points to
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise


def _summary(facts: Facts, o: Options, where: str, path: str) -> str:
    spared, judged = tools(facts)
    seen = [t.glob for t in spared if t.apps]
    layout = ", ".join(facts.roles.layouts()) or "self-hosted"
    text = (f"{where}: target {o.target} at {facts.server} (PostgreSQL {facts.version},"
            f" {'standby' if facts.in_recovery else 'primary'}, {layout}); tools spared:"
            f" {', '.join(seen) or 'none connected'}; {len(judged)} applications judged;"
            f" dry run on. Next: pg-watchdog check -c {path} --connect")
    return fit(text, 2000)[0]


def run_init(args: argparse.Namespace) -> int:
    """The `init` command."""
    try:
        return _run(args)
    except InitError as exc:
        print(f"pg-watchdog: {exc}", file=sys.stderr)
        return exc.code


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    idle = _duration("--idle", args.idle)
    iit = _duration("--idle-in-transaction", args.idle_in_transaction)
    look = _duration("--look", args.look) or 3.0
    try:
        dsn, removed = without_secrets(args.connect)
    except conninfo.ConninfoError as exc:
        raise InitError(f"--connect: {exc.message}") from None
    target = Target(args.target_name, args.connect, None, parse_duration(args.interval))
    facts = asyncio.run(take_look(target, look))  # TargetError: one line, exit 1 (cli)
    options = Options(dsn, removed, args.target_name, idle, iit, args.interval, args.audit_path)
    text = render(facts, options, datetime.now(UTC))
    # Belt and braces: no password of the DSN survives anywhere in the text.
    text = scrub(text, [s for s in conninfo.passwords(args.connect) if len(s) > 3])
    path = args.output or "<init>"
    try:
        _validate(text, path, facts)
    except ConfigError as exc:
        print(f"pg-watchdog: internal error, nothing written: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.output:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(_summary(facts, options, "printed", "FILE"), file=sys.stderr)
    else:
        try:
            _write(Path(args.output), text, args.force)
        except FileExistsError:
            raise InitError(f"{args.output} exists; use --force to replace it") from None
        except OSError as exc:
            raise InitError(f"cannot write {args.output}: {error_reason(exc)}",
                            EXIT_FAILED) from None
        print(_summary(facts, options, f"wrote {args.output}", args.output))
    if not facts.sees_all:
        print("pg-watchdog: warning: the role cannot see other roles' sessions"
              f" (GRANT pg_monitor TO {fit(facts.role, 64)[0]};): the applications listed are"
              " incomplete",
              file=sys.stderr)
    return EXIT_OK
