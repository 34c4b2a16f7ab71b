"""`pg-watchdog audit`: read the audit log (rotated files included), filter it, report.

The reading itself is watchdog.audit.reader: streamed, torn lines skipped and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watchdog.audit.reader import (
    Record,
    audit_files,
    iter_records,
    open_log,
    parse_when,
    warn,
)
from watchdog.audit.render import (
    Summary,
    record_client,
    record_time,
    write_json_lines,
    write_table,
)
from watchdog.core.model import Result
from watchdog.text.errors import reason
from watchdog.text.escape import json_line

OUTCOMES = tuple(r for r in Result if r is not Result.INTENT)  # the final ones
# Exact-match filters: argparse dest -> record field.
_EXACT_FILTERS: tuple[tuple[str, str], ...] = (("target", "target"), ("policy", "policy"))
_EXACT_FILTERS += (("user", "usename"), ("db", "datname"), ("outcome", "outcome"))

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
            warn(f"--{flag}: {e}")
            return 2
    since, until = bounds["since"], bounds["until"]
    if since is not None and until is not None and since >= until:
        warn(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
        return 2

    try:
        _networks(args)
    except ValueError as e:
        warn(str(e))
        return 2

    file = getattr(args, "file", None)
    path = Path(file) if file else audit_path_from_config(getattr(args, "config", None))
    out = sys.stdout
    try:
        files = audit_files(path)
        if files[-1] == path:
            with open_log(path):  # fail before printing anything
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
            warn("no matching audit records")
        out.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as e:
        warn(f"cannot read audit log {path}: {reason(e)}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
