"""Hostile pooler consoles: what one read of each costs the watchdog's process.

tests/pgwire.py's fake console (its own process) answers SHOW SOCKETS as a broken or hostile
PgBouncer would. For each mode, the watchdog's PoolerWatch reads it once (the public path of
every sweep), while a 10 ms heartbeat on the same event loop records the longest stall: what
every other target of the process would wait. Each mode runs in a fresh process, so the
peak resident memory (VmHWM) is that read's own.

    .venv/bin/python bench/pooler_hostile.py [--rows 150000] [--modes huge,endless,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, cpu_model, table

sys.path.insert(0, str(REPO / "tests"))

from pgwire import fake_console

from watchdog.config.policy import PoolerConfig, Target
from watchdog.pgbouncer.watch import PoolerWatch

MODES = ("good", "huge", "endless", "giant", "wrong-types", "hang")


def vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(port: int) -> dict[str, object]:
    target = Target("main", "postgresql://watchdog@127.0.0.1/postgres", None, 30.0,
                    (PoolerConfig("fake", f"postgresql://watchdog@127.0.0.7:{port}/pgbouncer"),))
    watch = PoolerWatch(target)
    worst = 0.0

    async def beat() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            worst, last = max(worst, now - last - 0.01), now

    before = vm("VmRSS")
    heart = asyncio.create_task(beat())
    started = time.monotonic()
    round_ = await watch.read()
    took = time.monotonic() - started
    heart.cancel()
    await watch.close()
    rows = len(round_.looks[0].sockets) if round_.looks else 0
    error = next(iter(round_.errors.values()), "")
    return {"rows": rows, "error": error.replace("main: pooler fake: ", ""),
            "read_s": round(took, 2), "stall_ms": round(worst * 1000),
            "base_mb": round(before), "peak_mb": round(vm("VmHWM"))}


def child(mode: str, rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            fake_console(Path(tmp), mode, max_client_conn=100_000, rows=rows) as (port, _, _):
        print(json.dumps({"mode": mode, **asyncio.run(one(port))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000, help="rows of the huge answer")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rows)
        return
    results = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(args.rows)],
                             capture_output=True, text=True, check=True, timeout=300)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results))
        return
    print(f"machine: {cpu_model()}, console claims max_client_conn 100000")
    keys = ("mode", "rows", "error", "read_s", "stall_ms", "base_mb", "peak_mb")
    print(table(keys, [[r[k] for k in keys] for r in results]))


if __name__ == "__main__":
    main()
