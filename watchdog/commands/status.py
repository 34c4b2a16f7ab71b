"""`pg-watchdog status`: the connection picture of each target, and what the policies will do.

Session values (user names, application names) come from the servers being watched and may
hold newlines or terminal escapes: text output goes through text.fit's escaping, JSON
through text.escape's terminal-safe encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from watchdog.commands.forecast_render import forecast_json, forecast_line
from watchdog.config.policy import Config, Target
from watchdog.config.units import format_duration
from watchdog.config.vocab import IN_TRANSACTION
from watchdog.core.blockers import describe as describe_blocking
from watchdog.core.clients import describe_client
from watchdog.core.decide import decide
from watchdog.core.forecast import Forecast, History, sample_of
from watchdog.core.model import Session, Snapshot, Verdict
from watchdog.pg.connect import STATEMENT_TIMEOUT, close_quietly, describe_error, open_target
from watchdog.pg.prepared import PreparedXact, read_prepared
from watchdog.pgbouncer.watch import PoolerRound, PoolerWatch
from watchdog.service.sweep import look
from watchdog.text.escape import json_line
from watchdog.text.fit import fit

IDLE_IN_TRANSACTION = IN_TRANSACTION
_OLDEST_IIT = "oldest_idle_in_transaction_s"
_SHOWN = 5  # next actions listed per group in text mode
_XMIN_SHOWN = 3  # sessions holding back vacuum, in text mode
_CLEAR = "\x1b[H\x1b[2J"
_EXPLAIN_TITLES = ("PID", "USER", "APP", "DB", "CLIENT", "STATE", "AGE", "VERDICT")
_EXPLAIN_CAPS = (8, 20, 24, 16, 32, 29, 8, 72)

Report = dict[str, Any]


def _age(snapshot: Snapshot, s: Session) -> float | None:
    if s.state_change is None:
        return None
    # now() is the statement's start; a session may change state a moment after it.
    return max((snapshot.now - s.state_change).total_seconds(), 0.0)


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))


def _oldest(
    snapshot: Snapshot, sessions: tuple[Session, ...], states: tuple[str, ...]
) -> float | None:
    ages = [a for s in sessions if s.state in states and (a := _age(snapshot, s)) is not None]
    return round(max(ages), 3) if ages else None


def _verdict_text(v: Verdict, dry: bool) -> str:
    if v.policy is None:
        return v.reason
    if v.acting:
        return f"policy {v.policy} {'would act now (dry run)' if dry else 'acts now'}"
    return f"policy {v.policy} in {format_duration(v.due_in or 0.0)}"


def _session_json(snapshot: Snapshot, v: Verdict, dry: bool) -> Report:
    s = v.session
    age = _age(snapshot, s)
    blocking = snapshot.blocking.get(s.pid)
    verdict = _verdict_text(v, dry)
    if blocking is not None and "blocks " not in verdict:
        verdict += f"; {describe_blocking(blocking)}"
    return {
        "pid": s.pid,
        "backend_type": s.backend_type,
        "user": s.usename,
        "application": s.application_name,
        "database": s.datname,
        "client_addr": s.client_addr,
        # Behind a pooler: the real client ("ADDR:PORT via pgb1"), or that the pool holds it.
        "client": describe_client(snapshot.pooled.get(s.pid)) or s.client_addr,
        "state": s.state,
        "age_s": None if age is None else round(age, 3),
        "policy": v.policy,
        "acting": v.acting,
        "due_in_s": None if v.due_in is None else round(v.due_in, 3),
        "dry_run": dry if v.policy is not None else None,
        "reason": v.reason,
        "verdict": verdict,
        "blocking": None if blocking is None else blocking._asdict(),
        "xmin_age": s.xmin_age,
    }


def _xmin_holders(snapshot: Snapshot) -> list[Report]:
    """The sessions holding back vacuum the most (largest backend_xmin age first)."""
    held = [s for s in snapshot.sessions if s.xmin_age is not None and s.pid != snapshot.own_pid]
    held.sort(key=lambda s: (-(s.xmin_age or 0), s.pid))
    return [
        {
            "pid": s.pid,
            "user": s.usename,
            "application": s.application_name,
            "state": s.state,
            "xmin_age": s.xmin_age,
            "age_s": None if (age := _age(snapshot, s)) is None else round(age, 3),
        }
        for s in held[:_SHOWN]
    ]


def _pools(target: Target, round_: PoolerRound) -> list[Report]:
    """Each pooler's clients and pools (SHOW SOCKETS counted per database and user)."""
    out: list[Report] = []
    looks = {look.name: look for look in round_.looks}
    for p in target.poolers:
        look_ = looks.get(p.name)
        if look_ is None:
            out.append({"pooler": p.name, "error": round_.errors.get(p.name, "not read")})
            continue
        out.append({
            "pooler": p.name,
            "clients": look_.clients_used,
            "max_client_conn": look_.max_client_conn,
            "pools": [
                {"database": x.database, "user": x.user, "cl_active": x.cl_active,
                 "cl_waiting": x.cl_waiting, "sv_active": x.sv_active, "sv_idle": x.sv_idle,
                 "sv_used": x.sv_used, "maxwait_s": round(x.maxwait_s, 3)}
                for x in look_.pools()
            ],
        })
    return out


def build_report(
    config: Config,
    target: Target,
    server: str,
    snapshot: Snapshot,
    explain: bool,
    poolers: PoolerRound | None = None,
    prepared: tuple[PreparedXact, ...] = (),
    forecast: Forecast | None = None,
) -> Report:
    """Everything `status` shows about one target, as JSON-ready values."""
    decision = decide(snapshot, config, target.name)
    policies = {p.name: p for p in config.policies}

    def dry(v: Verdict) -> bool:
        p = policies.get(v.policy or "")
        return config.dry_run or (p is not None and p.dry_run)

    clients = snapshot.clients
    used = snapshot.used
    num = snapshot.server_version_num
    planned = sorted(
        (v for v in decision.verdicts if v.policy is not None),
        key=lambda v: (0.0 if v.acting else (v.due_in or 0.0), v.session.pid),
    )
    report: Report = {
        "target": target.name,
        "server": server,
        "server_version": f"{num // 10000}.{num % 10000}",
        "role": "standby" if snapshot.in_recovery else "primary",
        "in_recovery": snapshot.in_recovery,
        "now": snapshot.now.isoformat(),
        "own_pid": snapshot.own_pid,
        "max_connections": snapshot.max_connections,
        "superuser_reserved_connections": snapshot.superuser_reserved,
        "reserved_connections": snapshot.reserved if num >= 160000 else None,
        "capacity": snapshot.capacity,
        "used": used,
        "headroom": snapshot.capacity - used,
        "saturation_pct": round(100.0 * snapshot.saturation, 1),
        # Rows whose backend_type is hidden: the role lacks pg_read_all_stats.
        "hidden_sessions": sum(1 for s in snapshot.sessions if not s.backend_type),
        "by_state": _counts(s.state or "(not visible)" for s in clients),
        "by_user": _counts(s.usename or "" for s in clients),
        "by_application": _counts(s.application_name for s in clients),
        "oldest_idle_s": _oldest(snapshot, clients, ("idle",)),
        _OLDEST_IIT: _oldest(snapshot, clients, IDLE_IN_TRANSACTION),
        "due_now": sum(1 for v in planned if v.acting),
        "over_limit": decision.over_limit,
        "next_actions": [_session_json(snapshot, v, dry(v)) for v in planned],
        "holding_back_vacuum": _xmin_holders(snapshot),
        # Two-phase commits left prepared: no timeout ends them (see `advise`).
        "prepared_transactions": [
            {**x.as_json(), "stale": x.age_s >= config.alerts.prepared_older_than}
            for x in prepared
        ],
        "forecast": forecast_json(forecast),
    }
    if target.poolers:
        report["pools"] = _pools(target, poolers or PoolerRound())
    if explain:
        report["explain"] = [_session_json(snapshot, v, dry(v)) for v in decision.verdicts]
    return report


# -- text ---------------------------------------------------------------------


def _safe(value: object, width: int = 64) -> str:
    return fit("" if value is None else str(value), width)[0]


def _dist(counts: dict[str, int]) -> str:
    return ", ".join(f"{_safe(k, 40) or '(empty)'} {n}" for k, n in counts.items()) or "none"


def _action_line(a: Report) -> str:
    who = f"pid {a['pid']} user {_safe(a['user'], 32)} app '{_safe(a['application'], 32)}'"
    return f"{who} {a['state']} {format_duration(a['age_s'] or 0.0)}: {_safe(a['verdict'], 80)}"


def _cells(row: Iterable[str], widths: Iterable[int]) -> str:
    parts = []
    for cell, width in zip(row, widths, strict=True):
        shown, used = fit(cell, width)
        parts.append(shown + " " * (width - used))
    return "  ".join(parts).rstrip()


def _explain_table(rows: list[Report]) -> list[str]:
    cells = [
        (
            str(r["pid"]),
            r["user"] or "",
            r["application"],
            r["database"] or "",
            r["client"] or "",
            r["state"] or "",
            "" if r["age_s"] is None else format_duration(r["age_s"]),
            r["verdict"],
        )
        for r in rows
    ]
    widths = [
        min(cap, max([len(title)] + [fit(c[i], cap)[1] for c in cells]))
        for i, (title, cap) in enumerate(zip(_EXPLAIN_TITLES, _EXPLAIN_CAPS, strict=True))
    ]
    lines = [_cells(_EXPLAIN_TITLES, widths)]
    return lines + [_cells(c, widths) for c in cells]


def _pool_lines(pools: list[Report]) -> list[str]:
    lines = []
    for p in pools:
        head = f"  pools        {_safe(p['pooler'])}: "
        if "error" in p:
            lines.append(head + f"not read ({_safe(p['error'], 200)})")
            continue
        lines.append(head + f"{p['clients']} clients of max_client_conn {p['max_client_conn']}")
        lines += [
            f"    {_safe(x['database'], 32)}/{_safe(x['user'], 32)}: clients {x['cl_active']}"
            f" active, {x['cl_waiting']} waiting (oldest {format_duration(x['maxwait_s'])});"
            f" servers {x['sv_active']} active, {x['sv_idle']} idle, {x['sv_used']} used"
            for x in p["pools"]
        ]
    return lines


def _prepared_lines(xacts: list[Report]) -> list[str]:
    if not xacts:
        return []
    stale = sum(1 for x in xacts if x["stale"])
    head = f"  prepared     {len(xacts)} prepared transaction{'s' if len(xacts) != 1 else ''}"
    if stale:
        head += f", {stale} older than alerts.prepared_older_than (pg-watchdog advise)"
    return [head] + [
        f"    gid {_safe(repr(x['gid']), 80)} {format_duration(x['age_s'])} old, owner"
        f" {_safe(x['owner'], 32)}, database {_safe(x['database'], 32)}, xid age {x['xid_age']}"
        + ("  STALE" if x["stale"] else "")
        for x in xacts[:_SHOWN]
    ] + ([f"    ... and {len(xacts) - _SHOWN} more"] if len(xacts) > _SHOWN else [])


def render_text(r: Report) -> str:
    """The human form of one target's report."""
    slots = f"max_connections {r['max_connections']} - superuser_reserved_connections "
    slots += str(r["superuser_reserved_connections"])
    if r["reserved_connections"] is not None:
        slots += f" - reserved_connections {r['reserved_connections']}"
    oldest = [
        f"{label} {'-' if r[key] is None else format_duration(r[key])}"
        for label, key in (("idle", "oldest_idle_s"), (IDLE_IN_TRANSACTION[0], _OLDEST_IIT))
    ]
    lines = [
        f"{_safe(r['target'])}  PostgreSQL {r['server_version']}  ({_safe(r['server'])})"
        + ("  hot standby (in recovery)" if r["in_recovery"] else ""),
        f"  slots        {slots} = {r['capacity']} ordinary",
        f"  used         {r['used']} of {r['capacity']}, headroom {r['headroom']},"
        f" {r['saturation_pct']:g}% saturated",
        f"  by state     {_dist(r['by_state'])}",
        f"  by user      {_dist(r['by_user'])}",
        f"  by app       {_dist(r['by_application'])}",
        f"  oldest       {', '.join(oldest)}",
    ]
    xmin = [
        f"pid {x['pid']} '{_safe(x['application'], 32)}' {x['state']} {x['xmin_age']} xids"
        for x in r.get("holding_back_vacuum", [])[:_XMIN_SHOWN]
    ]
    lines += [f"  xmin held    {', '.join(xmin)}"] if xmin else []
    lines += _prepared_lines(r.get("prepared_transactions", []))
    lines += [f"  forecast     {forecast_line(r['forecast'])}"] if "forecast" in r else []
    lines += _pool_lines(r.get("pools", []))
    if r["hidden_sessions"]:
        lines.append(
            f"  warning      {r['hidden_sessions']} sessions are hidden from the watchdog's role,"
            " so these counts are incomplete: GRANT pg_monitor to it"
        )
    now = [a for a in r["next_actions"] if a["acting"]]
    later = [a for a in r["next_actions"] if not a["acting"]]
    extra = f" ({r['over_limit']} beyond limits.max_per_sweep)" if r["over_limit"] else ""
    lines.append(f"  due now      {len(now)} session{'s' if len(now) != 1 else ''}{extra}")
    lines += [f"    {_action_line(a)}" for a in now[:_SHOWN]]
    lines += [f"    ... and {len(now) - _SHOWN} more"] if len(now) > _SHOWN else []
    lines.append(f"  next         {'none scheduled' if not later else ''}".rstrip())
    lines += [f"    {_action_line(a)}" for a in later[:_SHOWN]]
    lines += [f"    ... and {len(later) - _SHOWN} more"] if len(later) > _SHOWN else []
    if "explain" in r:
        lines += ["", *(f"  {line}" for line in _explain_table(r["explain"]))]
    return "\n".join(lines) + "\n"


# -- the loop -----------------------------------------------------------------


class _Held:
    """The connection kept open per target across `--watch` rounds."""

    def __init__(self) -> None:
        self.conns: dict[str, tuple[Any, str]] = {}
        self.poolers: dict[str, PoolerWatch] = {}
        self.histories: dict[str, History] = {}  # --watch: the forecast's history

    async def look(
        self, config: Config, target: Target, explain: bool, watching: bool = False
    ) -> Report:
        held = self.conns.get(target.name)
        if target.poolers and target.name not in self.poolers:
            self.poolers[target.name] = PoolerWatch(target)
        try:
            if held is None or held[0].is_closed():
                held = self.conns[target.name] = await open_target(target)
            snapshot, pooled = await look(
                held[0], held[1], self.poolers.get(target.name), config.member_roles()
            )
            prepared = await read_prepared(held[0], STATEMENT_TIMEOUT)
        except Exception as exc:
            await self.drop(target.name)
            return {"target": target.name, "error": describe_error(target, exc)}
        fc = None
        if watching:
            history = self.histories.setdefault(target.name, History())
            history.observe(sample_of(snapshot, time.monotonic()))
            fc = history.forecast()
        return build_report(
            config, target, held[1], snapshot, explain, pooled, prepared, fc
        )

    async def drop(self, name: str) -> None:
        held = self.conns.pop(name, None)
        if held is not None:
            await close_quietly(held[0])

    async def close(self) -> None:
        await asyncio.gather(*(self.drop(name) for name in list(self.conns)))
        await asyncio.gather(*(p.close() for p in self.poolers.values()))


def _print_round(reports: list[Report], args: argparse.Namespace, clear: bool) -> int:
    failed = [r for r in reports if "error" in r]
    out: list[str] = [_CLEAR] if clear else []
    if args.json:
        out.append(json_line({"targets": reports}) + "\n")
    else:
        out.append("\n".join(render_text(r) for r in reports if "error" not in r))
    sys.stdout.write("".join(out))
    sys.stdout.flush()
    for r in failed:  # after the screen is cleared, or the clearing would hide them
        print(f"pg-watchdog: {_safe(r['error'], 400)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


async def run_status(config: Config, args: argparse.Namespace) -> int:
    """Print each target's picture once, or every ``args.watch`` seconds until Ctrl-C."""
    held = _Held()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watch: float | None = args.watch
    handled: list[signal.Signals] = []
    if watch is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
    clear = watch is not None and sys.stdout.isatty() and not args.json
    try:
        while True:
            reports = await asyncio.gather(
                *(held.look(config, t, args.explain, watch is not None) for t in config.targets)
            )
            code = _print_round(list(reports), args, clear)
            if watch is None or stop.is_set():
                return code
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(watch, 0.1))
            if stop.is_set():
                return code
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await held.close()
