"""`pg-watchdog demo`: reproduces the exhaustion incident, heals it, and leaves nothing behind,
also when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MAJORS

_TMP = re.compile(r"PostgreSQL \d+ in (/\S+)")


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "watchdog", "demo", "--fast", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _leftover_processes(tmp: str) -> list[str]:
    """Processes whose command line or working directory lies in the demo's temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if tmp in cmdline or cwd.startswith(tmp):
            found.append(f"{entry.name}: {cmdline}")
    return found


def _assert_cleaned_up(tmp: str) -> None:
    assert not Path(tmp).exists(), f"{tmp} was left behind"
    deadline = time.monotonic() + 30  # exiting processes are slow on a loaded machine
    while (left := _leftover_processes(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
def test_demo_reproduces_the_incident_heals_it_and_cleans_up(major: int) -> None:
    proc = _demo("--major", str(major))
    out, err = proc.communicate(timeout=120)  # how fast it heals: the README's figure
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    m = _TMP.search(out)
    assert m, out
    assert re.search(r"FATAL:  remaining connection slots are reserved for .*SQLSTATE 53300", out)
    assert re.search(r"terminated +pid \d+ \(app, 'leaky-app', idle for", out)
    assert re.search(r"terminated +pid \d+ \(app, 'leaky-app', idle in transaction for", out)
    assert re.search(r"spares +pid \d+ \(postgres, 'dba-console', .*\): superuser", out)
    assert re.search(r"spares +pid \d+ \(backup, 'pg_dump', .*excluded application 'pg_dump'", out)
    assert re.search(r"spares +pid \d+ \(app, 'leaky-app', active .*no policy for state", out)
    assert "a new ordinary connection succeeds" in out
    assert "pg-watchdog audit --file" in out
    summary = out[out.index("--summary") :]
    assert re.search(r"total +\d+", summary)
    assert re.search(r"\d+ +terminated", summary)
    assert "spared" not in summary.lower()
    # The leak traced to the one statement the leaky application leaves its sessions after.
    shape = "SELECT id, status FROM orders WHERE id = $1 AND status <> $2 FOR UPDATE"
    assert re.search(rf"by statement\n +\d+  {re.escape(shape)}\n", summary), summary
    advice = out[out.index("$ pg-watchdog advise") :]
    assert re.search(rf"(\d+) of \1 kills of leaky-app were idle \(\d+\) or idle in"
                     rf" transaction \(\d+\) after `{re.escape(shape)}`", advice), advice
    assert f"Look first at the code that runs `{shape}`" in advice, advice
    _assert_cleaned_up(m.group(1))


@pytest.mark.parametrize(
    ("sig", "when"),
    [
        (signal.SIGINT, "starting a throwaway PostgreSQL"),
        (signal.SIGTERM, "opens connection 3"),
        (signal.SIGINT, "terminated "),
    ],
    ids=["sigint-while-starting", "sigterm-while-leaking", "sigint-while-healing"],
)
def test_interrupted_demo_still_cleans_up(sig: signal.Signals, when: str) -> None:
    proc = _demo()
    assert proc.stdout is not None
    tmp = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        tmp = tmp or (m.group(1) if (m := _TMP.search(line)) else None)
        if when in line:
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=60)
    out = "".join(lines) + rest
    assert tmp is not None, out
    assert proc.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "interrupted; cleaning up" in err
    _assert_cleaned_up(tmp)
