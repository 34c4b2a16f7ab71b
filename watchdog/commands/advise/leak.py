"""`advise` finding from the audit log alone: the application the watchdog keeps killing, the
statements its sessions last ran, and the pool recipe that cures it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from watchdog.commands.advise import clients, shapes
from watchdog.commands.advise.findings import (
    IIT,
    MIN_KILLS,
    MIN_SHARE,
    Finding,
    Record,
    Window,
    age_text,
    client_of,
    counted_once,
    group,
    kills_of,
    rate_text,
    through_pooler,
    top,
)
from watchdog.config.policy import Policy


def leak(
    target: str, records: Sequence[Record], window: Window,
    policies: Mapping[str, Policy] | None = None,
) -> list[Finding]:
    """The application (and role) the watchdog keeps killing, against everyone else."""
    kills = kills_of(records)
    found = []
    for (app, role), mine in group(kills, "application_name", "usename").items():
        if len(mine) < MIN_KILLS or len(mine) / len(kills) < MIN_SHARE:
            continue
        mine_ids = {id(r) for r in mine}
        others = [r for r in kills if id(r) not in mine_ids]
        states = Counter(str(r.get("state")) for r in mine)
        clients_seen = Counter(c for r in mine if (c := client_of(r)) is not None)
        evidence = [
            f"{rate_text(mine, window)}: {len(mine)} of the {len(kills)} kills on {target}"
            f" ({100 * len(mine) / len(kills):.0f}%)",
            f"state at kill: {top(states)}; {age_text(mine)}",
            f"everyone else: {len(others)} kills" + (f", {age_text(others)}" if others else ""),
        ]
        if len(clients_seen) > 1 or through_pooler(mine):
            behind = " (real clients behind the pooler)" if through_pooler(mine) else ""
            evidence.append(f"from {len(clients_seen)} client addresses{behind}: "
                            f"{top(clients_seen)}")
        evidence += counted_once(records, mine)
        name = str(app) if app else ""
        subject = (f"application '{name}' (role {role})" if name
                   else f"sessions without an application_name (role {role})")
        if not name:
            evidence.append(f"{len(mine)} kills of sessions that sent no application_name:"
                            " they cannot be attributed to an application")
        evidence += shapes.statement_evidence(name or "sessions without an application_name", mine)
        policy = clients.idle_threshold(mine, policies or {})
        fix = _leak_fix(name, states, policy)
        look = shapes.first_look(mine)
        found.append(Finding("leak", "high", target, subject, tuple(evidence),
                             tuple(([look] if look else []) + fix)))
    return found


def _leak_fix(app: str, states: Counter[str], policy: Policy | None) -> list[str]:
    fix = []
    who = f"'{app}'" if app else "each application"
    if any(s in IIT for s in states):
        fix.append(
            f"In {who}: end every transaction on every path (commit or rollback in a finally"
            " block or a context manager); a session left idle in transaction holds its locks"
            " and its slot."
        )
    if not app:
        fix.append("Give every application a name (application_name), so its kills can be"
                   " attributed; per library:")
        fix += [f"  {line}" for line in clients.naming_lines()]
    known = clients.recognise(app)
    if known is not None:
        fix.append(
            f"'{app}' is what {known.name} sends by default: let its pool survive a killed"
            f" connection and retire idle ones itself {clients.margin_text(policy)}:"
        )
        fix += [f"  {line}" for line in clients.recipe_lines(policy, known)]
        fix.append("Every application of that library sends this name; tell them apart:")
        fix.append(f"  {known.name}: {known.naming}")
    else:
        fix.append(
            "Let its pool survive a killed connection and retire idle ones itself"
            f" {clients.margin_text(policy)}; per library (each tested with the real library):"
        )
        fix += [f"  {line}" for line in clients.recipe_lines(policy)]
    return fix
