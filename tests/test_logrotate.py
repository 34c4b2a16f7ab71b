"""The shipped logrotate file, run by the real logrotate, and `pg-watchdog audit` reading
what it leaves: every record exactly once, oldest first, whatever the naming style."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from faults import run_cli

from watchdog.audit.journal import journals
from watchdog.audit.log import AuditLog
from watchdog.audit.reader import audit_files

SHIPPED = Path(__file__).resolve().parents[1] / "systemd" / "pg-watchdog.logrotate"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def _record(n: int) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {"ts": ts, "target": "main", "policy": "idle", "action": "terminate",
            "dry_run": False, "outcome": "terminated", "error": None, "pid": 1000 + n,
            "sweep": f"sweep-{n}"}


def _config(tmp_path: Path, audit: Path, style: str) -> Path:
    """The shipped file pointed at ``audit``, as root (no pg-watchdog user here)."""
    text = SHIPPED.read_text().replace("/var/log/pg-watchdog/audit.jsonl", str(audit))
    text = text.replace("pg-watchdog pg-watchdog", "root root")
    if style == "numbered":
        text = re.sub(r"^\s*(dateext|dateformat .*)$\n", "", text, flags=re.M)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)  # logrotate ignores a config file others may write
    return conf


def _logrotate(conf: Path, state: Path) -> None:
    res = subprocess.run([LOGROTATE, "-v", "-s", str(state), "-f", str(conf)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr.lower(), res.stderr


def _next_second() -> None:
    """dateformat -%Y%m%d-%s names by the second: two rotations need two seconds."""
    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.05)


@pytest.mark.parametrize("style", ["dateext", "numbered"])
def test_real_logrotate_twice_audit_reads_every_record_once(tmp_path: Path, style: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    audit_path = logs / "audit.jsonl"
    conf = _config(tmp_path, audit_path, style)
    state = tmp_path / "logrotate.state"
    audit = AuditLog(audit_path)
    # A live process's journal with an intent in flight: never rotated, never read as a log.
    audit.write_intents([_record(99) | {"outcome": "intent"}])
    journal = audit.intent_path.read_bytes()
    written = 0
    for rotation in range(3):
        audit.append([_record(written + i) for i in range(3)])
        written += 3
        if rotation < 2:
            _next_second()
            _logrotate(conf, state)
    names = sorted(p.name for p in logs.iterdir())
    print(style, names)
    if style == "dateext":
        dated = r"audit\.jsonl-\d{8}-\d{10}"
        assert [n for n in names if re.fullmatch(dated + r"\.gz", n)], names
        assert [n for n in names if re.fullmatch(dated, n)], names
    else:
        assert {"audit.jsonl.1", "audit.jsonl.2.gz"} <= set(names), names
    assert audit.intent_path.read_bytes() == journal
    assert journals(audit_path) == [audit.intent_path]

    res = run_cli("audit", "--file", audit_path, "--since", "1d", "--json")
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [r["pid"] for r in got] == [1000 + n for n in range(written)]  # once, in order
    audit.close()


def test_audit_files_orders_both_styles_and_skips_journals(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    names = ["audit.jsonl-20261110-1762732800.gz", "audit.jsonl-20261117-1763337600.gz",
             "audit.jsonl-20261117-1763380000", "audit.jsonl-20261124", "audit.jsonl.3.gz",
             "audit.jsonl.2.gz", "audit.jsonl.1", "audit.jsonl"]
    for n in reversed(names):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "audit.jsonl.intents").mkdir()
    (tmp_path / "audit.jsonl.intents" / "12-0badc0de.intent").write_bytes(b"")
    (tmp_path / "audit.jsonl.intents.1").mkdir()  # a directory is never a log
    (tmp_path / "audit.jsonl.bak").write_bytes(b"")
    assert [p.name for p in audit_files(path)] == names


def test_shipped_maxsize_rotates_a_fast_growing_log_before_the_week_is_out(
    tmp_path: Path,
) -> None:
    """The shipped `maxsize` (scaled down here from 100M to 4k) makes logrotate's daily run
    rotate a log that grew past it, though a week has not passed; nothing is lost."""
    text = SHIPPED.read_text()
    assert re.search(r"^\s*maxsize 100M$", text, flags=re.M), "the shipped file lacks maxsize"
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    audit_path = logs / "audit.jsonl"
    conf = _config(tmp_path, audit_path, "dateext")
    conf.write_text(conf.read_text().replace("maxsize 100M", "maxsize 4k"))
    state = tmp_path / "logrotate.state"
    audit = AuditLog(audit_path)
    audit.append([_record(0)])
    _daily(conf, state)  # first sight of the log: noted, not rotated
    assert sorted(p.name for p in logs.iterdir()) == ["audit.jsonl"]
    audit.append([_record(n) for n in range(1, 40)])
    assert audit_path.stat().st_size > 4096
    _next_second()
    _daily(conf, state)
    rotated = [p.name for p in logs.iterdir() if p.name != "audit.jsonl"]
    assert len(rotated) == 1 and re.fullmatch(r"audit\.jsonl-\d{8}-\d{10}", rotated[0]), rotated
    audit.append([_record(40)])
    res = run_cli("audit", "--file", audit_path, "--json")
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [r["pid"] for r in got] == [1000 + n for n in range(41)]
    audit.close()


def _daily(conf: Path, state: Path) -> None:
    """logrotate as its daily timer runs it: not forced."""
    res = subprocess.run([LOGROTATE, "-v", "-s", str(state), str(conf)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr.lower(), res.stderr
