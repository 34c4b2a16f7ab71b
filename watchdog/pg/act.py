"""Signalling backends: one race-safe statement for the whole batch, then one confirmation.

The caller has already written the intent to the audit log; this module only
talks to the server and reports what happened to each action.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from watchdog.config.vocab import Signal
from watchdog.core.model import Action, Outcome, Result, Session
from watchdog.pg import queries

log = logging.getLogger("watchdog.act")  # the name log filters know

# pg_terminate_backend only sends SIGTERM; a backend normally exits within
# milliseconds. Look again for the whole batch, briefly, before calling one failed: soon at
# first, then every 25 ms (a look costs the server one read of pg_stat_activity), so that
# the sweep is done within 25 ms of the last exit, in at most ~80 looks.
CONFIRM_WITHIN = 2.0
_CONFIRM_STEPS = (0.002, 0.004, 0.008, 0.016)
_CONFIRM_EVERY = 0.025

_VERDICT_OUTCOME = {"gone": Result.GONE, "changed": Result.SKIPPED_CHANGED}
_REFUSED = {
    "denied_superuser": "permission denied: only a superuser can signal a superuser's backend",
    "denied": "permission denied: the watchdog role needs pg_signal_backend",
    "unknown_action": "unknown action: only terminate and cancel are ever signalled",
}


def dry_outcomes(actions: Sequence[Action]) -> list[Outcome]:
    """The would_* outcomes of actions that must not be signalled."""
    return [Outcome(a, Result.would(a.action)) for a in actions]


async def execute(
    conn: Any,
    actions: Sequence[Action],
    timeout: float | None = None,
    known: dict[int, Outcome] | None = None,
) -> list[Outcome]:
    """Signal ``actions`` (none of them dry) in one statement and confirm terminations.

    ``known`` (by pid) gets each outcome as soon as it is certain, so a caller interrupted
    during the confirmation still records the rows the server already answered for.
    """
    if not actions:
        return []
    if any(a.dry_run for a in actions):
        raise ValueError("dry-run actions must never reach execute()")
    by_pid = {a.session.pid: a for a in actions}
    was_open = not conn.is_closed()
    try:
        rows = await conn.fetch(
            queries.ACT,
            [a.session.pid for a in actions],
            [a.session.backend_start for a in actions],
            [a.session.state for a in actions],
            [a.session.state_change for a in actions],
            [a.action for a in actions],
            timeout=timeout,
        )
    except Exception as exc:  # every action must get an outcome
        error = f"{type(exc).__name__}: {exc}"
        log.error("signalling %d backends failed: %s", len(actions), error)
        if was_open:
            # The statement may have reached the server, which then signals every row it
            # gets to (connection lost, timeout, crash mid-statement): the outcome is
            # unknown, and 'failed' would claim that nothing was signalled.
            why = f"the signalling statement failed; some or all may have been signalled: {error}"
            return [Outcome(a, Result.UNCONFIRMED, why) for a in actions]
        return [Outcome(a, Result.FAILED, error) for a in actions]

    outcomes: dict[int, Outcome] = {}
    terminated: list[Action] = []
    for row in rows:
        a = by_pid[row["pid"]]
        verdict = row["verdict"]
        if verdict in _VERDICT_OUTCOME:
            outcomes[a.session.pid] = Outcome(a, _VERDICT_OUTCOME[verdict])
        elif verdict in _REFUSED:
            outcomes[a.session.pid] = Outcome(a, Result.FAILED, _REFUSED[verdict])
        elif row["signalled"] is None:  # the statement sent no signal for this row
            why = f"not signalled (verdict {verdict})"
            outcomes[a.session.pid] = Outcome(a, Result.FAILED, why)
        elif not row["signalled"]:
            # The function returns false when the pid is no longer a backend.
            outcomes[a.session.pid] = Outcome(a, Result.GONE)
        elif a.action == Signal.CANCEL:
            outcomes[a.session.pid] = Outcome(a, Result.CANCELLED)
        else:
            terminated.append(a)
    if known is not None:
        known.update(outcomes)
    try:
        survivors = await _survivors(conn, terminated, timeout)
    except Exception as exc:  # the signals went out; say we could not confirm
        error = f"signalled, but confirming failed: {type(exc).__name__}: {exc}"
        for a in terminated:
            outcomes[a.session.pid] = Outcome(a, Result.UNCONFIRMED, error)
        survivors = None
    for a, survived in zip(terminated, survivors or [], strict=False):
        outcomes[a.session.pid] = (
            Outcome(a, Result.FAILED, f"backend still running {CONFIRM_WITHIN:g}s after SIGTERM")
            if survived
            else Outcome(a, Result.TERMINATED)
        )
    if known is not None:
        known.update(outcomes)
    return [outcomes[a.session.pid] for a in actions]


async def _survivors(conn: Any, terminated: list[Action], timeout: float | None) -> list[bool]:
    """For each terminated action, whether its backend outlived the confirmation window."""
    pending = {a.session.pid for a in terminated}
    deadline = time.monotonic() + CONFIRM_WITHIN
    steps = iter(_CONFIRM_STEPS)
    while pending:
        pending = await still_there(
            conn, [a.session for a in terminated if a.session.pid in pending], timeout
        )
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(next(steps, _CONFIRM_EVERY))
    return [a.session.pid in pending for a in terminated]


async def still_there(conn: Any, sessions: Sequence[Session], timeout: float | None) -> set[int]:
    """The pids of ``sessions`` whose very backend (same pid and backend_start) still runs."""
    rows = await conn.fetch(
        queries.STILL_THERE,
        [s.pid for s in sessions],
        [s.backend_start for s in sessions],
        timeout=timeout,
    )
    return {r["pid"] for r in rows}
