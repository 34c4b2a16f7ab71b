"""The policy file `pg-watchdog init` writes: commented YAML, pure text from the facts it saw.

Every value that came from the server (role and application names, addresses) is written by
PyYAML's own emitter, one line, quoted and escaped as YAML needs; in comments too, so a name
holding a newline, a quote or a terminal escape can neither change the file's structure nor
a terminal showing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import yaml

from watchdog.commands.init.fit import (
    alert_percent,
    escalation_percent,
    pooler_dsn,
    poolers,
    thresholds,
    tools,
)
from watchdog.commands.init.look import AppSeen, Facts
from watchdog.config.policy import PROVIDER_ADMIN_ROLES
from watchdog.config.units import format_duration
from watchdog.config.units import policy_duration as duration

# Free in Prometheus's default port allocations; 9187 is postgres_exporter's.
METRICS_PORT = 9654
APPS_LISTED = 30


@dataclass(frozen=True)
class Options:
    dsn: str  # already without secrets
    removed: tuple[str, ...]  # the secret keys taken out of it
    target: str = "main"
    idle: float | None = None
    idle_in_transaction: float | None = None
    interval: str = "5s"
    audit_path: str = "/var/log/pg-watchdog/audit.jsonl"


def scalar(value: str | int | float | bool | None) -> str:
    """``value`` as one line of YAML, by PyYAML's emitter (quoted and escaped where needed)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=False,
                          width=2**31 - 1).removesuffix("\n").removesuffix("\n...")
    if "\n" in text or yaml.safe_load(text) != value:  # a style PyYAML would fold: force one
        text = yaml.safe_dump(value, default_style='"', allow_unicode=False,
                              width=2**31 - 1).removesuffix("\n")
    return text


def note(value: str) -> str:
    """``value`` for a comment: as is when printable ASCII, else escaped by :func:`scalar`."""
    return value if value.isascii() and value.isprintable() else scalar(value)


def _names(values: tuple[str, ...] | list[str], limit: int = 6) -> str:
    shown = ", ".join(note(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _app_line(app: AppSeen) -> str:
    states = ", ".join(f"{n} {s}" for s, n in sorted(app.states.items(), key=lambda x: -x[1]))
    where = f", from {_names(list(app.addrs), 3)}" if app.addrs else ""
    roles = _names(list(app.users), 3)
    name = scalar(app.name)  # quoted as YAML would: '' for an empty name, and no line break
    return f"  #   {name}: {app.peak} ({states}), role {roles}{where}"


def _header(facts: Facts, o: Options, now: datetime) -> list[str]:
    layout = ", ".join(facts.roles.layouts()) or "self-hosted"
    role = "hot standby (in recovery)" if facts.in_recovery else "primary"
    return [
        f"# pg-watchdog policy file written by `pg-watchdog init` at {now:%Y-%m-%d %H:%M}Z after"
        f" a {facts.seconds:g}s look",
        f"# at {note(facts.server)}: PostgreSQL {note(facts.version)}, {role}, {layout}.",
        "# Each fitted value says why. Check it: pg-watchdog check -c THIS_FILE --connect",
        "# Dry run: the watchdog decides and records (pg-watchdog audit), signals nothing.",
        "# When the records look right, set dry_run: false and reload (systemctl reload).",
        "dry_run: true",
        "",
    ]


def _target(facts: Facts, o: Options) -> list[str]:
    lines = ["targets:", f"  - name: {scalar(o.target)}"]
    if facts.in_recovery:
        lines.append("    # a hot standby: sweeps work here as on a primary; its primary needs a"
                     " target of its own")
    else:
        lines.append("    # the primary (not in recovery); each standby needs a target of its own")
    if facts.rolsuper:
        lines += ["    # connected as a superuser: least privilege is a role of its own:",
                  "    #   CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO"
                  " watchdog;"]
    lines.append(f"    dsn: {scalar(o.dsn)}")
    if o.removed:
        what = " and an ".join(o.removed)
        lines += [f"    # The DSN had a {what}: never written here. Put the password in a file"
                  " only the", "    # service reads (mode 0640, group pg-watchdog), or in"
                  " ~/.pgpass, and uncomment:",
                  f"    # password_file: /etc/pg-watchdog/{o.target}.password"]
    lines.append(f"    interval: {o.interval}   # how often it looks; also how often the"
                 " exhaustion forecast samples")
    named, busy = poolers(facts)
    if named or busy:
        why = [f"application {note(n)}" for n in named[:3]]
        why += [f"{n} backends at once from {a}" for a, n in busy[:3]]
        lines += [f"    # A pooler in front? ({'; '.join(why)}.) If it is a PgBouncer, list it:"
                  " the watchdog then names", "    # the real client of each backend and spares"
                  " the pool's own connections (pip install 'pg-watchdog[pgbouncer]'):",
                  "    # poolers:"]
        for i, (addr, _) in enumerate(busy[:3] or [("PGBOUNCER_HOST", 0)], 1):
            dsn = pooler_dsn(addr, facts.role if addr != "PGBOUNCER_HOST" else "watchdog")
            lines += [f"    #   - name: pgb{i}", f"    #     dsn: {scalar(dsn)}"]
    return [*lines, ""]


def _exclude(facts: Facts, judged: tuple[AppSeen, ...], o: Options) -> list[str]:
    found, _ = tools(facts)
    supers = list(facts.superusers)
    lines = ["exclude:                 # never touched by any policy",
             "  # login superusers here: " + (_names(supers) if supers else "none"),
             "  superusers: true"]
    layouts = facts.roles.layouts()
    members = [r for r in facts.roles.roles if r.member_of and not r.rolsuper]
    if layouts:
        lines.append("  # " + "; ".join(f"{p} layout (role {note(r)} exists)"
                                         for p, r in layouts.items())
                     + ": its admin logins are no superusers but members of its admin role")
        if members:
            lines.append("  # members now: " + "; ".join(
                f"{note(r.name)} ({', '.join(r.member_of)})" for r in members[:6]))
    else:
        lines.append("  # self-hosted: none of these roles exists here; listed so the file"
                     " also fits a managed server")
    lines.append(f"  member_of: [{', '.join(PROVIDER_ADMIN_ROLES)}]")
    lines.append("  users: []")
    lines.append("  applications:           # tools a person runs: delete a line to judge it")
    for t in found:
        seen = sum(a.peak for a in t.apps)
        said = (f"{t.label}: {seen} session{'s' if seen != 1 else ''} now"
                f" ({_names([a.name for a in t.apps], 3)})" if t.apps
                else f"{t.label}: not connected now; a shipped default")
        lines.append(f"    - {scalar(t.glob)}   # {said}")
    lines.append("  # The applications the policies will judge (most sessions at once during the"
                 " look):")
    lines += [_app_line(a) for a in judged[:APPS_LISTED]] or ["  #   none connected now"]
    if len(judged) > APPS_LISTED:
        lines.append(f"  #   ... and {len(judged) - APPS_LISTED} more")
    lines += ["  databases: []", "  client_addrs: []             # CIDRs, e.g. 10.0.0.0/8"]
    listening = ", ".join(f"{note(a)} {n}" for a, n in sorted(facts.listeners.items()))
    lines.append("  # sessions waiting on LISTEN now: " + (listening or "none"))
    lines.append("  listeners: true          # they look idle but wait for NOTIFY")
    repl = ", ".join(f"{note(k)} {n}" for k, n in sorted(facts.replication.items()))
    lines.append("  # replication now: " + (repl or "none")
                 + " (never signalled: only client backends are)")
    lines.append("  pooled: true             # behind a pooler: its server connections with no"
                 " client")
    return [*lines, ""]


def _timeouts(facts: Facts) -> list[str]:
    lines = ["# The server's own timeouts (pg_settings), which the thresholds below keep clear of:"]
    for t in facts.timeouts:
        if t.ms is None:
            lines.append(f"#   {t.name}: not in PostgreSQL {note(facts.version)}")
        else:
            value = format_duration(t.ms / 1000) if t.ms else "0 (off)"
            lines.append(f"#   {t.name} = {value}" + (f" ({t.source})" if t.ms else ""))
    for role, db, name, value in facts.role_timeouts[:10]:
        who = f"role {note(role)}" if role else "every role"
        where = f" in database {note(db)}" if db else ""
        lines.append(f"#   {name} = {note(value)} for {who}{where} (ALTER ... SET)")
    return lines


def _policies(facts: Facts, o: Options) -> list[str]:
    idle, iit = thresholds(facts, o.idle, o.idle_in_transaction)
    pct = escalation_percent(facts.capacity)
    left = facts.capacity - math.ceil(pct * facts.capacity / 100)
    lines = [*_timeouts(facts), "policies:"]
    for name, state, th in (("idle", "idle", idle), ("idle-in-transaction",
                            "[idle in transaction, idle in transaction (aborted)]", iit)):
        lines += [f"  - name: {name}", f"    state: {state}"]
        lines += [f"    # {n}" for n in th.notes]
        lines += [f"    longer_than: {duration(th.seconds)}", "    action: terminate"]
    lines += [
        "  # Self-healing escalation: when nearly full, reclaim idle sessions sooner. Policies are",
        "  # tried in order and the first that matches decides: to enable, move it first.",
        f"  # {facts.capacity} ordinary slots: max_connections {facts.max_connections}"
        f" - superuser_reserved_connections {facts.superuser_reserved}"
        + (f" - reserved_connections {facts.reserved}" if facts.version_num >= 160000 else ""),
        f"  # (when full, the FATAL comes); at {pct}% {left} are left.",
        "  # - name: idle-when-full",
        "  #   state: idle",
        "  #   longer_than: 1m",
        f"  #   when: {{connections_above: {pct}%}}",
        "",
    ]
    return lines


def _rest(facts: Facts, o: Options) -> list[str]:
    pct = alert_percent(facts)
    peak = round(100 * facts.peak_used / max(facts.capacity, 1))
    why = (f"it used {peak}% ({facts.peak_used}/{facts.capacity}) during the look, so"
           f" {pct}%, not the default 80%" if pct > 80 else
           f"{facts.peak_used}/{facts.capacity} ordinary slots ({peak}%) used during the look")
    return [
        "limits:",
        "  max_per_sweep: 50",
        "",
        "audit:",
        f"  path: {scalar(o.audit_path)}",
        "",
        "alerts:",
        "  sentry:",
        "    dsn: ${SENTRY_DSN:-}     # empty or unset: Sentry off",
        "    environment: production",
        f"  # {why}",
        f"  connections_above: {pct}%",
        "  # forecast: alert when the slots will run out within this at the current rate",
        "  exhaustion_within: 10m",
        "",
        f"# Prometheus metrics (opt-in). Port {METRICS_PORT} is marked free in Prometheus's default"
        " port allocations;",
        "# 9187 is postgres_exporter's, often on the same host.",
        "# metrics:",
        f"#   listen: 127.0.0.1:{METRICS_PORT}",
    ]


def render(facts: Facts, o: Options, now: datetime) -> str:
    """The whole policy file."""
    _, judged = tools(facts)
    lines = [*_header(facts, o, now), *_target(facts, o), *_exclude(facts, judged, o),
             *_policies(facts, o), *_rest(facts, o)]
    return "\n".join(lines) + "\n"
