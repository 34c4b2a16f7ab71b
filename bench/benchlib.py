"""Shared pieces of the benchmarks: the machine, tables, percentiles, sessions held in bulk.

Sessions are held by a separate process (``python bench/benchlib.py hold ...``), so the
process being measured carries no client load of its own, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # temppooler, the suite's throwaway PgBouncers
    sys.path.insert(1, str(REPO / "tests"))

from watchdog.commands.demo.tempcluster import TempCluster  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine(pg: TempCluster) -> str:
    """One line naming the machine, Python and PostgreSQL the figures come from."""
    version = pg.psql("SHOW server_version").split()[0]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: nproc {os.cpu_count()} ({cpu_model()}), Python {platform.python_version()}, "
        f"PostgreSQL {version}, {platform.system()} {platform.release()}, load avg {load}"
    )


_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|^\d{10}\.\d{3} ", re.MULTILINE)


def log_entries(path: Path, offset: int = 0) -> list[str]:
    """The server log's entries from byte ``offset`` on (continuation lines kept with theirs)."""
    with path.open(errors="replace") as f:
        f.seek(offset)
        text = f.read()
    starts = [m.start() for m in _ENTRY.finditer(text)] + [len(text)]
    return [text[a:b] for a, b in itertools.pairwise(starts)]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i and _numeric(c) else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-.") and text[-1] not in ":"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def raise_nofile(wanted: int) -> int:
    """Raise the open-files soft limit towards ``wanted``; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def setup_roles(pg: TempCluster, watchdog_settings: str = "") -> None:
    """Roles ``app`` (the sessions) and ``watchdog`` (least privilege, as the README says)."""
    grants = "pg_monitor, pg_signal_backend"
    if pg.major >= 16:
        grants += ", pg_use_reserved_connections"
    pg.psql(
        f"CREATE ROLE app LOGIN; CREATE ROLE watchdog LOGIN; GRANT {grants} TO watchdog;"
        + watchdog_settings
    )


class Holder:
    """A child process holding ``n`` sessions open until closed (see ``hold`` below)."""

    def __init__(self, dsn: str, n: int, app: str, mode: str = "idle", spread: float = 0.0):
        self.n = n
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "hold", dsn, str(n), app, mode, str(spread)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            raise RuntimeError(f"holder failed to open {n} sessions: {line or 'no output'}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _hold(dsn: str, n: int, app: str, mode: str, spread: float) -> None:
    raise_nofile(n + 256)
    settings = {"application_name": app}
    conns: list[asyncpg.Connection] = []
    sem = asyncio.Semaphore(64)  # the postmaster forks one backend at a time anyway

    async def one() -> asyncpg.Connection:
        async with sem:
            for attempt in range(5):
                try:
                    return await asyncpg.connect(dsn, timeout=60, server_settings=settings)
                except (OSError, asyncpg.TooManyConnectionsError):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.5)
            raise AssertionError("unreachable")

    conns = list(await asyncio.gather(*(one() for _ in range(n))))
    busy: list[asyncio.Task[object]] = []
    if mode == "idle":
        await asyncio.gather(*(c.execute("SELECT 1") for c in conns))
    elif mode == "iit":
        await asyncio.gather(*(c.execute("BEGIN; SELECT 1") for c in conns))
    elif mode in ("stagger", "stagger_iit"):
        # Active now, idle (or idle in transaction) at evenly spread moments over `spread` s.
        step = spread / max(n - 1, 1)
        begin = "BEGIN; " if mode == "stagger_iit" else ""
        busy = [
            asyncio.create_task(c.execute(f"{begin}SELECT pg_sleep({i * step:.3f})"))
            for i, c in enumerate(conns)
        ]
        await asyncio.sleep(0.2)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for c in conns:
        c.terminate()
    for t in busy:
        t.cancel()
    await asyncio.gather(*busy, return_exceptions=True)


def main() -> None:
    p = argparse.ArgumentParser(description="bench helper")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold")
    for name in ("dsn", "n", "app", "mode", "spread"):
        h.add_argument(name)
    a = p.parse_args()
    asyncio.run(_hold(a.dsn, int(a.n), a.app, a.mode, float(a.spread)))


if __name__ == "__main__":
    main()


# The seed policies, nothing due, for the sweep-cost benches ({poolers}: a target's poolers line).
SEED_POLICY = """
targets:
  - name: bench
    dsn: {dsn}
{poolers}
exclude:
  superusers: true
  applications: ["pg_dump*", "pg_basebackup", "psql"]
  listeners: true
policies:
  - name: idle
    state: idle
    longer_than: 10m
  - name: idle-in-transaction
    state: [idle in transaction, idle in transaction (aborted)]
    longer_than: 5m
audit:
  path: {audit}
"""


async def samples_ms(fn: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    """Wall time of ``runs`` calls of ``fn``, each in milliseconds."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t) * 1000)
    return times
