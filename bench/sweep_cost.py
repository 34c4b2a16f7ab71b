"""Sweep cost: what one dry-run sweep with nothing due costs, against the bare
``SELECT * FROM pg_stat_activity`` over asyncpg, at 100, 1,000 and 5,000 sessions.

Each size gets its own throwaway server (max_connections = sessions + 20, small
shared_buffers, pg_stat_statements loaded where the server ships it); a child process holds
the idle sessions. The policies are the shipped seed (policies/default.yaml, dry run). Each
checkout given by --watchdog-tree (default: this one) is measured by bench/sweep_probe.py in
a child process of its own, the checkouts taking turns for --rounds rounds on the same
server, so that before/after figures share the machine's moment. Per round and checkout,
median of --runs of each, on the watchdog's own connection (role watchdog):

  client, end to end (ms):
    bare      conn.fetch("SELECT * FROM pg_stat_activity")
    snapshot  watchdog.pg.snapshot.take_snapshot (the one SNAPSHOT query, rows -> Sessions)
    +decide   take_snapshot + decide(explain=False), as a sweep decides
    sweep     watchdog.service.sweep.sweep_target, dry run, nothing due (= a sweep of `run`)
  server, SNAPSHOT / bare read:
    once      EXPLAIN ANALYZE planning + execution, planned anew with the values bound
    run       EXPLAIN ANALYZE execution of the generic plan (asyncpg's prepared statement
              is planned generically after five executions)
    pgss      pg_stat_statements mean_exec_time over asyncpg's prepared statements
  On 17+ EXPLAIN's SERIALIZE BINARY counts the output's serialization, as asyncpg gets it.

Ratios are per round; the table gives their median over the rounds and [min-max].

    .venv/bin/python bench/sweep_cost.py [--major 18] [--sizes 100,1000,5000] [--runs 30]
        [--rounds 3] [--watchdog-tree DIR ...] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, Holder, machine, raise_nofile, setup_roles, table

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster

PROBE = Path(__file__).resolve().with_name("sweep_probe.py")


def has_pg_stat_statements(major: int) -> bool:
    from watchdog.commands.demo.tempcluster import find_bindir

    return (find_bindir(major).parent / "lib" / "pg_stat_statements.so").exists() or Path(
        f"/usr/lib/postgresql/{major}/lib/pg_stat_statements.so"
    ).exists()


def probe(pg: TempCluster, tree: Path, runs: int, pgss: bool, profile: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(PROBE), str(tree), pg.dsn("watchdog"), pg.dsn(), str(runs)]
    cmd += ["--pgss"] * pgss + ["--profile"] * profile
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"sweep_probe.py failed for {tree}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_size(major: int, n: int, trees: list[Path], runs: int, rounds: int, profile: bool
             ) -> tuple[dict[str, list[dict[str, Any]]], str]:
    pgss = has_pg_stat_statements(major)
    settings = {"shared_buffers": "16MB", "max_locks_per_transaction": "16"}
    if pgss:
        settings["shared_preload_libraries"] = "'pg_stat_statements'"
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as tmp:
        Path(tmp).chmod(0o711)
        pg = start_cluster(major, max_connections=n + 20, settings=settings, base_dir=Path(tmp))
        try:
            setup_roles(pg)
            if pgss:
                pg.psql("CREATE EXTENSION pg_stat_statements")
            t = time.monotonic()
            results: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
            with Holder(pg.dsn("app"), n, "bench-idle"):
                print(f"  {n} sessions open in {time.monotonic() - t:.1f}s", flush=True)
                for r in range(rounds):
                    for tree in trees:
                        last = profile and r == rounds - 1
                        results[str(tree)].append(probe(pg, tree, runs, pgss, last))
                    print(f"  round {r + 1}/{rounds} done", flush=True)
            return results, machine(pg)
        finally:
            pg.cleanup()


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Median [min-max] of per-round values."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-" \
           f"{fmt.format(max(values))}]"


def summary(n: int, tree: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(key: str) -> list[float]:
        return [r["ms"][key] for r in rounds]

    def server(kind: str) -> list[float]:
        return [r["server_ms"][kind]["snapshot"] / r["server_ms"][kind]["bare"]
                for r in rounds if r["server_ms"].get(kind, {}).get("bare")]

    return {
        "sessions": n,
        "tree": tree,
        "rows": rounds[0]["rows"],
        "bare_ms": ms("bare"),
        "snapshot_ms": ms("snapshot"),
        "decide_ms": ms("decide"),
        "sweep_ms": ms("sweep"),
        "sweep_over_bare": [r["ms"]["sweep"] / r["ms"]["bare"] for r in rounds],
        "sessions_build_ms": [r["parts_ms"]["sessions"] for r in rounds],
        "decide_only_ms": [r["parts_ms"]["decide"] for r in rounds],
        "decide_explain_ms": [r["parts_ms"]["explain"] for r in rounds],
        "server_once": server("fresh"),
        "server_run": server("generic"),
        "server_pgss": server("pgss"),
        "serialize": rounds[0]["server_ms"]["serialize"],
        "planning_ms": [r["server_ms"]["planning"]["snapshot"] for r in rounds],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--watchdog-tree", type=Path, action="append", dest="trees",
                   help="a checkout of pg-watchdog to measure (repeat to compare; default: this)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    trees = [t.resolve() for t in a.trees or [REPO]]
    sizes = [int(s) for s in a.sizes.split(",")]
    raise_nofile(max(sizes) + 1024)
    rows: list[dict[str, Any]] = []
    about = ""
    profiles: dict[str, str] = {}
    for n in sizes:
        print(f"size {n}: starting PostgreSQL {a.major} with max_connections={n + 20}", flush=True)
        results, about = run_size(a.major, n, trees, a.runs, a.rounds,
                                  a.profile and n == max(sizes))
        for tree, rounds in results.items():
            rows.append(summary(n, tree, rounds))
            if rounds[-1].get("profile"):
                profiles[tree] = rounds[-1]["profile"]
    if a.json:
        print(json.dumps({"machine": about, "rows": rows}, indent=1))
        return
    print()
    print(about)
    print(f"{a.rounds} rounds, each the median of {a.runs} runs per measurement; ratios: median "
          "[min-max] over the rounds; targets: sweep/bare <= 1.2x, server <= 1.2x")
    if rows and not rows[0]["serialize"]:
        print("(before PostgreSQL 17 EXPLAIN cannot count the output's serialization)")
    many = len(trees) > 1
    print(table(
        ["sessions", *(["checkout"] * many), "bare ms", "snapshot", "+decide", "sweep",
         "sweep/bare", "server once", "server run", "server pgss", "rows->Session", "decide()",
         "explain"],
        [[r["sessions"], *([Path(r["tree"]).name] * many), spread(r["bare_ms"]),
          spread(r["snapshot_ms"]), spread(r["decide_ms"]), spread(r["sweep_ms"]),
          spread(r["sweep_over_bare"], "{:.2f}x"), spread(r["server_once"], "{:.2f}x"),
          spread(r["server_run"], "{:.2f}x"),
          spread(r["server_pgss"], "{:.2f}x") if r["server_pgss"] else "-",
          spread(r["sessions_build_ms"]), spread(r["decide_only_ms"]),
          spread(r["decide_explain_ms"])] for r in rows],
    ))
    for tree, text in profiles.items():
        print(f"\ncProfile of 10 dry-run sweeps at the largest size, {tree} (by own time):")
        print(text)


if __name__ == "__main__":
    main()
