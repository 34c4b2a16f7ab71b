"""`pg-watchdog advise`: read the audit log, look at each target once, print the findings.

Text goes through text.fit's escaping (application and role names come from the watched
servers); JSON through text.escape's terminal-safe encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from watchdog.audit import forecast_log
from watchdog.audit.reader import iter_records, parse_when
from watchdog.audit.render import record_time
from watchdog.commands.advise.analyse import analyse
from watchdog.commands.advise.findings import Finding, Record, Window
from watchdog.commands.advise.look import Look, take_look
from watchdog.config.policy import Config
from watchdog.pg.connect import TargetError
from watchdog.text.errors import reason as error_reason
from watchdog.text.escape import json_line
from watchdog.text.fit import fit

DEFAULT_SINCE = "7d"
EXIT_OK, EXIT_TARGET, EXIT_USAGE = 0, 1, 2


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the `advise` command's options to ``p``."""
    p.add_argument(
        "--since", metavar="WHEN", default=DEFAULT_SINCE,
        help=f"audit records at or after WHEN: a duration ago or an ISO 8601 timestamp "
        f"(default {DEFAULT_SINCE})",
    )
    p.add_argument("--target", action="append", metavar="NAME",
                   help="only this target; repeat for several")
    p.add_argument("--json", action="store_true", help='print {"findings": [...]} as JSON')


def _safe(text: str) -> str:
    return fit(text, 100_000)[0]


def render_text(
    findings: Sequence[Finding], window: Window, path: Path, count: int,
    errors: dict[str, str], out: TextIO, notes: dict[str, list[str]] | None = None,
) -> None:
    """The findings, most important first, each with its evidence and fix."""
    out.write(f"pg-watchdog advise: {count} audit records in {path}, {window.text()}\n")
    for name, error in errors.items():
        out.write(f"target {_safe(name)}: unreachable ({_safe(error)}); audit findings only\n")
    for name, lines in (notes or {}).items():
        out.writelines(f"target {_safe(name)}: note: {_safe(n)}\n" for n in lines)
    if not findings:
        out.write("no findings\n")
        return
    for i, f in enumerate(findings, 1):
        out.write(f"\n{i}. [{f.severity}] {f.id}  {_safe(f.target)}: {_safe(f.subject)}\n")
        out.write("   evidence:\n")
        out.writelines(f"     - {_safe(e)}\n" for e in f.evidence)
        out.write("   fix:\n")
        out.writelines(f"     {_safe(x)}\n" for x in f.fix)


def read_records(
    path: Path, since: datetime, targets: set[str]
) -> tuple[list[Record], datetime | None]:
    """The records of ``targets`` at or after ``since``, and the earliest time they cover."""
    kept: list[Record] = []
    start: datetime | None = None
    for rec in iter_records(path, since):
        ts = record_time(rec.get("ts"))
        if ts is None or ts < since or rec.get("target") not in targets:
            continue
        start = ts if start is None or ts < start else start
        kept.append(rec)
    return kept, start


async def _looks(config: Config, names: Sequence[str]) -> dict[str, Look | TargetError]:
    targets = [config.target(n) for n in names]
    results = await asyncio.gather(*(take_look(t) for t in targets), return_exceptions=True)
    out: dict[str, Look | TargetError] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, TargetError):
            raise result
        out[name] = result
    return out


def _warn(message: str) -> None:
    print(f"pg-watchdog: {_safe(message)}", file=sys.stderr)


def run_advise(config: Config, args: argparse.Namespace) -> int:
    """The `advise` command: 0 (findings or not), 1 if a target is unreachable, 2 on bad usage."""
    now = datetime.now(UTC)
    try:
        since = parse_when(args.since, now)
    except ValueError as e:
        _warn(f"--since: {e}")
        return EXIT_USAGE
    names = [t.name for t in config.targets]
    wanted: list[str] = args.target or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        _warn(f"--target: unknown target {unknown[0]!r} (targets: {', '.join(names)})")
        return EXIT_USAGE
    path = config.audit.path
    code = EXIT_OK
    records: list[Record] = []
    start: datetime | None = None
    try:
        records, start = read_records(path, since, set(wanted))
    except FileNotFoundError:
        pass  # nothing recorded yet: the live look alone speaks
    except OSError as e:
        _warn(f"cannot read audit log {e.filename or path}: {error_reason(e)}")
        code = EXIT_TARGET
    window = Window(max(start, since) if start is not None else None, now)
    forecasts: list[Record] = []
    try:
        forecasts = list(forecast_log.read(forecast_log.forecast_path(path), set(wanted), since))
    except OSError as e:
        _warn(f"cannot read the forecast records: {error_reason(e)}")
    looked = asyncio.run(_looks(config, wanted))
    errors = {n: str(v) for n, v in looked.items() if isinstance(v, TargetError)}
    looks: dict[str, Look | None] = {n: v for n, v in looked.items() if isinstance(v, Look)}
    findings = analyse(config, records, looks, window, wanted, forecasts)
    notes = {n: list(v.notes) for n, v in looks.items() if v is not None and v.notes}
    if args.json:
        doc = {
            "findings": [f.as_json() for f in findings],
            "window": {"since": since.isoformat(), "start": start and start.isoformat(),
                       "now": now.isoformat(), "records": len(records)},
            "unreachable": errors,
            "notes": notes,
        }
        sys.stdout.write(json_line(doc) + "\n")
    else:
        render_text(findings, window, path, len(records), errors, sys.stdout, notes)
    sys.stdout.flush()
    for error in errors.values():
        _warn(error)
    return EXIT_TARGET if errors else code
