"""`pg-watchdog audit`: read the audit log (rotated files included), filter it, report.

Reading streams record by record, so a log of millions of lines costs little memory
in table and JSON modes. A torn line (the daemon crashed mid-write) or any other
garbage is skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import fnmatch
import gzip
import io
import ipaddress
import json
import lzma
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from watchdog.audit import dirfiles as auditdir
from watchdog.audit.render import (
    Summary,
    record_client,
    record_time,
    write_json_lines,
    write_table,
)
from watchdog.config.units import parse_duration
from watchdog.text.escape import json_line

OUTCOMES: tuple[str, ...] = ("terminated", "cancelled", "would_terminate", "would_cancel")
OUTCOMES += ("skipped_changed", "gone", "failed", "unconfirmed")
# logrotate names: PATH.1, PATH.2.gz (higher is older) or, with dateext, PATH-20261125.gz
# and PATH-20261125-1764028800.gz (dateformat -%Y%m%d-%s: the epoch orders one day's files).
_ROTATED = r"(?:\.(\d+)|-(\d{8,})(?:-(\d+))?)(\.gz|\.bz2|\.xz)?"
_TORN_RETRIES = 8
# Exact-match filters: argparse dest -> record field.
_EXACT_FILTERS: tuple[tuple[str, str], ...] = (("target", "target"), ("policy", "policy"))
_EXACT_FILTERS += (("user", "usename"), ("db", "datname"), ("outcome", "outcome"))

Record = dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the `audit` command's options to `p`."""
    p.add_argument(
        "--file",
        metavar="PATH",
        help="audit log to read instead of audit.path from the config; "
        "rotated PATH.N, PATH-DATE (either compressed or not) are read too, oldest first",
    )
    when = "a duration ago (30s, 10m, 1h30m, 2d) or an ISO 8601 timestamp (naive means UTC)"
    p.add_argument("--since", metavar="WHEN", help=f"only records at or after WHEN: {when}")
    p.add_argument("--until", metavar="WHEN", help=f"only records before WHEN: {when}")
    for flag, metavar, what in (
        ("--target", "NAME", "this target"),
        ("--policy", "NAME", "this policy"),
        ("--user", "ROLE", "this role"),
        ("--app", "GLOB", "application_name matching this shell glob (e.g. 'etl-*')"),
        ("--db", "NAME", "this database"),
        ("--outcome", "OUTCOME", f"this outcome ({', '.join(OUTCOMES)})"),
    ):
        choices = OUTCOMES if flag == "--outcome" else None
        help = f"only {what}; repeat to match any of several"
        p.add_argument(flag, action="append", metavar=metavar, choices=choices, help=help)
    p.add_argument(
        "--client-addr",
        action="append",
        metavar="CIDR",
        help="only records whose client is in CIDR: the real client behind a pooler where"
        " known, else client_addr; repeat to match any of several",
    )
    p.add_argument("--json", action="store_true", help="print matching records as JSON lines")
    p.add_argument(
        "--summary",
        action="store_true",
        help="print counts by policy, user, application, outcome, client and statement"
        " (the shape of the last statement, constants as $n; a JSON object with --json)",
    )


def parse_when(text: str, now: datetime) -> datetime:
    """`text` as an aware UTC datetime: a duration before `now`, or an ISO 8601 timestamp."""
    stripped = text.strip()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if stripped.lower() == "now":
        return now.astimezone(UTC)
    # The same durations as the policy file.
    with contextlib.suppress(ValueError):
        seconds = parse_duration(stripped)
        try:
            return (now - timedelta(seconds=seconds)).astimezone(UTC)
        except OverflowError:
            raise ValueError(f"{text!r} reaches too far into the past") from None
    try:
        when = datetime.fromisoformat(stripped)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is neither a duration (e.g. 30s, 10m, 1h30m, 2d) "
            "nor an ISO 8601 timestamp (e.g. 2026-11-25T12:00:00Z)"
        ) from None


def audit_files(path: Path) -> list[Path]:
    """The rotated files of `path`, oldest first, then `path` itself if it exists."""
    pattern = re.compile(re.escape(path.name) + _ROTATED)
    rotated: list[tuple[int, str, int, str, Path]] = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is None:
                continue
            if entry.is_symlink():
                # Whoever owns the directory could point it at a file only root may read.
                _warn(f"not following {path.parent / entry.name}: {auditdir.SYMLINK}")
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            number, date, epoch, _ = m.groups()
            file = path.parent / entry.name
            if date is not None:
                # %Y%m%d, %Y%m%d%H, ... : padded, so a longer stamp of the same day sorts after.
                rotated.append((0, date.ljust(14, "0"), int(epoch or 0), entry.name, file))
            else:
                rotated.append((1, "", -int(number), entry.name, file))
    files = [entry for *_, entry in sorted(rotated)]
    if os.path.lexists(path) or not files:
        files.append(path)
    return files


@contextlib.contextmanager
def _open(path: Path) -> Iterator[io.BufferedIOBase]:
    """`path` for reading, never through a symbolic link, only if it is a regular file."""
    dir_fd = auditdir.open_dir(path.parent)
    try:
        fd = auditdir.open_file(dir_fd, path.name, os.O_RDONLY, path)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        elif path.suffix == ".bz2":
            with bz2.BZ2File(raw, "rb") as bz:
                yield bz
        elif path.suffix == ".xz":
            with lzma.LZMAFile(raw, "rb") as xz:
                yield xz
        else:
            yield raw


def _loads(line: bytes) -> Record | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _parse_line(line: bytes) -> tuple[Record | None, int]:
    """The record on `line` (or None) and how many unreadable pieces it held."""
    line = line.strip(b" \t\r\n")
    if not line:
        return None, 0
    rec = _loads(line)
    if rec is not None:
        return rec, 0
    # After a crash the daemon may append its next record to the torn one: salvage it.
    # `{"` cannot occur raw inside a JSON string, so each hit starts a candidate object.
    start = line.find(b'{"', 1)
    for _ in range(_TORN_RETRIES):
        if start == -1:
            break
        rec = _loads(line[start:])
        if rec is not None:
            return rec, 1
        start = line.find(b'{"', start + 1)
    return None, 1


def _warn(message: str) -> None:
    print(f"pg-watchdog: {message}", file=sys.stderr)


def _read_file(path: Path) -> Iterator[Record]:
    unreadable = 0
    with _open(path) as lines:
        for line in lines:
            rec, bad = _parse_line(line)
            unreadable += bad
            if rec is not None:
                yield rec
    if unreadable:
        _warn(f"skipped {unreadable} unreadable lines in {path}")


def iter_records(path: Path, since: datetime | None = None) -> Iterator[Record]:
    """Every record of `path` and its rotated files, oldest file first.

    `since` only lets whole rotated files last modified before it be skipped; records
    are not filtered. An unreadable rotated file is reported and skipped; `path`
    itself failing raises OSError.
    """
    for file in audit_files(path):
        if file == path:
            yield from _read_file(file)
            continue
        try:
            if since is not None and os.lstat(file).st_mtime < since.timestamp():
                continue
            yield from _read_file(file)
        except (OSError, EOFError, zlib.error) as e:
            _warn(f"cannot read rotated audit log {file}: {_reason(e)}")


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


def _networks(args: argparse.Namespace) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """--client-addr values as networks; ValueError (one line) for a bad one."""
    out = []
    for text in getattr(args, "client_addr", None) or []:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--client-addr: {text!r} is not an address or CIDR") from None
    return out


def _in(addr: Any, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def _matcher(
    args: argparse.Namespace, since: datetime | None, until: datetime | None
) -> Callable[[Mapping[str, Any]], bool]:
    exact = [
        (field, frozenset(values))
        for dest, field in _EXACT_FILTERS
        if (values := getattr(args, dest, None))
    ]
    globs: list[str] = getattr(args, "app", None) or []
    app = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
    app_names = frozenset(globs)  # a name with [ ] in it also matches itself
    networks = _networks(args)

    def match(rec: Mapping[str, Any]) -> bool:
        for field, allowed in exact:
            value = rec.get(field)
            if not isinstance(value, str) or value not in allowed:
                return False
        if app is not None:
            value = rec.get("application_name")
            if not isinstance(value, str):
                return False
            if value not in app_names and app.match(value) is None:
                return False
        if networks and not _in(record_client(rec), networks):
            return False
        if since is not None or until is not None:
            ts = record_time(rec.get("ts"))
            if ts is None or (since is not None and ts < since):
                return False
            if until is not None and ts >= until:
                return False
        return True

    return match


def _once_per_session(records: Iterable[Record], summary: Summary) -> Iterator[Record]:
    """Each session once per policy and outcome; every record counted in summary.records.

    A session is (target, server, pid, backend_start): a dry run that recorded the same
    leaked session every sweep (before it learned to record it once) counts it once,
    and a session signalled and confirmed has one record anyway. Records without a pid
    or backend_start count one each. Keys are kept as hashes: 1M sessions, about 70 MB.
    """
    seen: set[int] = set()
    for rec in records:
        summary.records += 1
        pid, start = rec.get("pid"), rec.get("backend_start")
        if isinstance(pid, int) and isinstance(start, str):
            session = (rec.get("target"), rec.get("server"), pid, start)
            key = hash((*session, rec.get("policy"), rec.get("outcome")))
            if key in seen:
                continue
            seen.add(key)
        yield rec


def _silence_stdout() -> None:
    """After EPIPE (`| head`), point stdout at /dev/null so the exit flush stays quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run(args: argparse.Namespace, audit_path_from_config: Callable[[str | None], Path]) -> int:
    """The `audit` command. Returns 0, 1 (audit log unreadable) or 2 (bad arguments)."""
    now = _now()
    bounds: dict[str, datetime | None] = {}
    for flag in ("since", "until"):
        text = getattr(args, flag, None)
        try:
            bounds[flag] = None if text is None else parse_when(text, now)
        except ValueError as e:
            _warn(f"--{flag}: {e}")
            return 2
    since, until = bounds["since"], bounds["until"]
    if since is not None and until is not None and since >= until:
        _warn(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
        return 2

    try:
        _networks(args)
    except ValueError as e:
        _warn(str(e))
        return 2

    file = getattr(args, "file", None)
    path = Path(file) if file else audit_path_from_config(getattr(args, "config", None))
    out = sys.stdout
    try:
        files = audit_files(path)
        if files[-1] == path:
            with _open(path):  # fail before printing anything
                pass
        records = filter(_matcher(args, since, until), iter_records(path, since))
        if args.summary:
            summary = Summary()
            for rec in _once_per_session(records, summary):
                summary.add(rec)
            if args.json:
                out.write(json_line(summary.as_json()) + "\n")
            else:
                summary.write_text(out)
        elif args.json:
            write_json_lines(records, out)
        elif write_table(records, out) == 0:
            _warn("no matching audit records")
        out.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as e:
        _warn(f"cannot read audit log {path}: {_reason(e)}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
