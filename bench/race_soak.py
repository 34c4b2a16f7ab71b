"""Race soak: does pg-watchdog ever kill a session that was not idle long enough?

A throwaway PostgreSQL logs every statement of every session with its pid and an
epoch timestamp (``log_statement=all``, ``log_min_duration_statement=0``,
``log_line_prefix='%n [%p] %a '``, connections and disconnections). N client
sessions flip at random between idling around the threshold, running short
statements, and holding transactions open (sometimes aborted) around the
threshold; they reconnect when terminated and remember, on their side, when
they sent each statement and when their connection died. The watchdog sweeps
meanwhile, either as the real ``pg-watchdog run`` process (``--mode daemon``,
at its 250 ms floor) or as the real TargetRunner/sweep code in a tight loop in
this process (``--mode inproc``, any interval).

Afterwards every record in the audit log is judged by the server's own view,
read from its log (file order is write order: every backend appends to the same
O_APPEND file):

* wrongful: the terminated session logged a statement start or end after the
  ``state_change`` the watchdog judged, and that line precedes the ACT
  statement's own log line (so the ACT's look at pg_stat_activity saw it), or
  the session was not in the recorded state then, or it was killed less than
  the threshold after ``state_change``. Must be 0.
* raced in ACT: a statement the server read after the ACT statement began but
  before the signal landed: the window between the ACT's look and its signal.
* in flight at kill: the client sent a statement before the backend died but
  the server never read it (no log line): unavoidable, counted, not hidden.
* unrecorded kills: a backend terminated by administrator command with no audit
  record; phantom: a ``terminated`` record for a backend the server never
  killed. Both must be 0.

Usage (from the repo root, as root or not):

    .venv/bin/python bench/race_soak.py --major 18 --clients 40 --sweeps 3000
    .venv/bin/python bench/race_soak.py --major 15 --mode daemon --sweeps 1200
    .venv/bin/python bench/race_soak.py --act-delay 0.2            # widen look→act gap
    .venv/bin/python bench/race_soak.py --act-delay 0.2 --unsafe-act  # checker must object

``--unsafe-act`` removes the race check from the ACT statement (this process
only, inproc mode) to show that the checker catches wrongful kills.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from watchdog.audit.log import AuditError, AuditLog  # noqa: E402
from watchdog.commands.demo.tempcluster import TempCluster, start_cluster  # noqa: E402
from watchdog.config.policy import load_config  # noqa: E402
from watchdog.pg import act as wd_act  # noqa: E402
from watchdog.pg import queries as wd_queries  # noqa: E402
from watchdog.pg.connect import TargetError  # noqa: E402
from watchdog.service import sweep as wd_sweep  # noqa: E402
from watchdog.service.runner import TargetRunner  # noqa: E402

APP = "soak"
WATCHDOG_APP = "pg-watchdog"
SIGNALLED = ("terminated", "unconfirmed")  # outcomes that claim a signal went out


def signalled(r: dict[str, Any]) -> bool:
    """Whether a record says its backend was (or may have been) signalled."""
    return r["outcome"] in SIGNALLED or (
        r["outcome"] == "failed" and "after SIGTERM" in (r.get("error") or "")
    )
LOG_SETTINGS = {
    "log_line_prefix": "'%n [%p] %a '",  # epoch with ms (PostgreSQL 13+), pid, application
    "log_statement": "'all'",
    "log_min_duration_statement": "0",
    "log_connections": "on",
    "log_disconnections": "on",
    "log_min_error_statement": "'error'",
}
CONNECTION_LOST = (
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,  # "connection is closed"
    # A FATAL that lands while the query is being sent can leave asyncpg's protocol in an
    # error state ("cannot switch to state 15"); the server log says whether it was a kill.
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
)


# -- the clients -------------------------------------------------------------------------


@dataclass
class Statement:
    sql: str
    sent: float  # client clock (time.time()), just before the send
    done: float | None = None
    error: str | None = None


@dataclass
class Life:
    """One client connection, from the client's side."""

    client: int
    pid: int
    opened: float
    statements: list[Statement] = field(default_factory=list)
    died: float | None = None  # when the client learned the connection had died
    death: str | None = None
    closed: bool = False  # closed by the client at the end of the run


async def _run(conn: asyncpg.Connection, life: Life, sql: str) -> None:
    st = Statement(sql, time.time())
    life.statements.append(st)
    try:
        await conn.execute(sql)  # no arguments: simple query protocol, one log line each
    except asyncpg.DivisionByZeroError as exc:
        st.error = type(exc).__name__
    st.done = time.time()


@dataclass
class Stop:
    at: float = float("inf")  # client clock; moved when the sweeper is done

    def __bool__(self) -> bool:
        return time.time() >= self.at


async def client(
    n: int, dsn: str, stop: Stop, threshold: float, rng: random.Random, lives: list[Life]
) -> None:
    """Idle, work, or hold a transaction at random; reconnect when terminated."""

    def around() -> float:
        return rng.uniform(0.5, 1.5) * threshold

    def work() -> str:
        return f"SELECT pg_sleep({rng.uniform(0.01, 0.1):.3f})"

    while not stop:
        try:
            conn = await asyncpg.connect(
                dsn, timeout=10, server_settings={"application_name": APP}
            )
        except (asyncpg.PostgresError, OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        life = Life(n, conn.get_server_pid(), time.time())
        lives.append(life)
        try:
            while not stop:
                r = rng.random()
                if r < 0.4:
                    await asyncio.sleep(around())
                elif r < 0.7:
                    for _ in range(rng.randint(1, 3)):
                        await _run(conn, life, work())
                else:
                    await _run(conn, life, "BEGIN")
                    if rng.random() < 0.8:
                        await _run(conn, life, work())
                    if rng.random() < 0.2:
                        await _run(conn, life, "SELECT 1/0")  # idle in transaction (aborted)
                    await asyncio.sleep(around())
                    if rng.random() < 0.3:
                        await _run(conn, life, "SELECT 1" if life.statements[-1].error is None
                                   else "ROLLBACK")
                        await asyncio.sleep(around())
                    await _run(conn, life, rng.choice(("COMMIT", "ROLLBACK")))
        except CONNECTION_LOST as exc:
            life.died = time.time()
            life.death = type(exc).__name__
            conn.terminate()
            continue
        life.closed = True
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (TimeoutError, *CONNECTION_LOST):
            conn.terminate()


# -- the watchdog ------------------------------------------------------------------------


def write_policy(path: Path, cluster: TempCluster, audit: Path, interval: str,
                 threshold: float) -> Path:
    thr = f"{round(threshold * 1000)}ms"
    path.write_text(
        f"""
targets:
  - name: soak
    dsn: {cluster.dsn("watchdog")}
    interval: {interval}
exclude:
  superusers: true
  applications: ["psql"]
policies:
  - name: idle
    state: idle
    longer_than: {thr}
    users: [app]
  - name: idle-in-transaction
    state: [idle in transaction, idle in transaction (aborted)]
    longer_than: {thr}
    users: [app]
limits:
  max_per_sweep: 200
audit:
  path: {audit}
  query: truncate
"""
    )
    return path


UNSAFE_ACT = wd_queries.ACT.replace(
    """WHEN a.state IS DISTINCT FROM v.state
               OR a.state_change IS DISTINCT FROM v.state_change THEN 'changed'""",
    "WHEN false THEN 'changed'",
)


@contextlib.contextmanager
def patched(unsafe_act: bool, act_delay: float, rng: random.Random) -> Iterator[None]:
    """In this process only: drop the ACT's race check, and/or wait before each ACT."""
    saved_act, saved_execute = wd_queries.ACT, wd_sweep.execute
    if unsafe_act:
        assert saved_act != UNSAFE_ACT, "the ACT statement changed shape; update UNSAFE_ACT"
        wd_queries.ACT = UNSAFE_ACT
    if act_delay > 0:

        async def slow_execute(conn: Any, actions: Any, timeout: float | None = None,
                               known: Any = None) -> Any:
            await asyncio.sleep(rng.uniform(0, act_delay))  # sessions change meanwhile
            return await wd_act.execute(conn, actions, timeout=timeout, known=known)

        wd_sweep.execute = slow_execute  # type: ignore[assignment]
    try:
        yield
    finally:
        wd_queries.ACT, wd_sweep.execute = saved_act, saved_execute


async def sweeper_inproc(policy: Path, stop_at: float, max_sweeps: int, interval: float,
                         stats: Counter[str]) -> None:
    """The real TargetRunner.sweep in a loop (what the service's job runs), every interval."""
    config = load_config(str(policy))
    runner = TargetRunner(config.targets[0])
    audit = AuditLog(config.audit.path)
    try:
        while time.time() < stop_at and stats["sweeps"] < max_sweeps:
            started = time.monotonic()
            try:
                await runner.sweep(config, audit, False)
            except (TargetError, AuditError) as exc:
                stats["sweep_errors"] += 1
                print(f"sweep failed: {exc}", file=sys.stderr)
            stats["sweeps"] += 1
            await asyncio.sleep(max(interval - (time.monotonic() - started), 0))
    finally:
        await runner.close()


def _tail_text(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:]


async def sweeper_daemon(policy: Path, log: Path, server_log: Path, stop_at: float,
                         max_sweeps: int, stats: Counter[str]) -> None:
    """The real `pg-watchdog run` process; sweeps are counted from the server log."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchdog", "run", "-c", str(policy),
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
        )
        try:
            tail = LogTail(server_log)
            while time.time() < stop_at and stats["sweeps"] < max_sweeps:
                await asyncio.sleep(0.5)
                if proc.returncode is not None:
                    raise RuntimeError(f"pg-watchdog run exited {proc.returncode}: "
                                       f"{_tail_text(log)}")
                stats["sweeps"] += sum(1 for e in tail.read() if is_snapshot(e))
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                stats["daemon_exit"] = await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                stats["daemon_exit"] = await proc.wait()


# -- the server log ----------------------------------------------------------------------

_PREFIX = re.compile(
    rb"^(\d+)\.(\d{3}) \[(\d+)\] (\S*) "
    rb"(LOG|FATAL|ERROR|DETAIL|STATEMENT|HINT|WARNING|CONTEXT|NOTICE|PANIC|INFO|DEBUG\d?):  (.*)$"
)


@dataclass
class Entry:
    pos: int  # index in file order
    ms: int  # epoch milliseconds, server clock
    pid: int
    app: str
    level: str
    text: str


class LogTail:
    """Entries of a PostgreSQL stderr log (continuation lines folded in), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pos = 0
        self.pending: Entry | None = None

    def read(self, final: bool = False) -> list[Entry]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.offset += cut
        out: list[Entry] = []
        for line in data[:cut].splitlines():
            m = _PREFIX.match(line)
            if m is None:
                if self.pending is not None:
                    self.pending.text += "\n" + line.decode("utf-8", "replace")
                continue
            if self.pending is not None:
                out.append(self.pending)
            sec, ms, pid, app, level, text = m.groups()
            self.pending = Entry(self.pos, int(sec) * 1000 + int(ms), int(pid),
                                 app.decode(), level.decode(), text.decode("utf-8", "replace"))
            self.pos += 1
        if final and self.pending is not None:
            out.append(self.pending)
            self.pending = None
        return out


def is_snapshot(e: Entry) -> bool:
    head = wd_queries.SNAPSHOT.strip().splitlines()[0]  # as bench/footprint.py tells a sweep
    return e.app == WATCHDOG_APP and e.text.startswith("execute ") and head in e.text


def is_act(e: Entry) -> bool:
    return (e.app == WATCHDOG_APP and e.text.startswith("execute ")
            and "pg_terminate_backend(" in e.text)


KILLED = "terminating connection due to administrator command"


@dataclass
class Event:
    pos: int
    ms: int
    kind: str  # start | end | error
    sql: str
    state_after: str  # the session's state once this event is through


@dataclass
class ServerSession:
    """One backend's life, from the server's log."""

    pid: int
    start_ms: int
    start_pos: int
    events: list[Event] = field(default_factory=list)
    fatal: Entry | None = None
    end_pos: int | None = None
    in_txn: bool = False
    aborted: bool = False
    running: str | None = None

    def idle_state(self) -> str:
        if self.aborted:
            return "idle in transaction (aborted)"
        return "idle in transaction" if self.in_txn else "idle"

    def state_at(self, pos: int) -> str:
        """Its state just before file position ``pos``."""
        state = "idle"
        for e in self.events:
            if e.pos >= pos:
                break
            state = e.state_after
        return state


def _statement_of(text: str) -> str:
    return text.split("statement: ", 1)[1].strip() if "statement: " in text else ""


def read_server_log(path: Path) -> tuple[list[Entry], dict[int, list[ServerSession]]]:
    """Every entry, and each pid's sessions (pids get reused) with their statement events."""
    entries = LogTail(path).read(final=True)
    sessions: dict[int, list[ServerSession]] = {}
    current: dict[int, ServerSession] = {}
    for e in entries:
        if e.level == "LOG" and e.text.startswith("connection received:"):
            s = ServerSession(e.pid, e.ms, e.pos)
            sessions.setdefault(e.pid, []).append(s)
            current[e.pid] = s
            continue
        s = current.get(e.pid)
        if s is None or e.app != APP:
            continue
        if e.level == "LOG" and e.text.startswith("statement: "):
            s.running = _statement_of(e.text)
            s.events.append(Event(e.pos, e.ms, "start", s.running, "active"))
        elif e.level == "LOG" and e.text.startswith("duration: ") and s.running is not None:
            word = s.running.split()[0].upper()
            if word == "BEGIN":
                s.in_txn, s.aborted = True, False
            elif word in ("COMMIT", "ROLLBACK", "END", "ABORT"):
                s.in_txn = s.aborted = False
            s.events.append(Event(e.pos, e.ms, "end", s.running, s.idle_state()))
            s.running = None
        elif e.level == "ERROR" and s.running is not None:
            s.aborted = s.in_txn
            s.events.append(Event(e.pos, e.ms, "error", s.running, s.idle_state()))
            s.running = None
        elif e.level == "FATAL":
            s.fatal = e
        elif e.level == "LOG" and e.text.startswith("disconnection:"):
            s.end_pos = e.pos
    return entries, sessions


def find_session(sessions: dict[int, list[ServerSession]], pid: int,
                 near_ms: int) -> ServerSession | None:
    """The session of ``pid`` that started closest to ``near_ms`` (within 2 s; pids recur)."""
    best = min(sessions.get(pid, ()), key=lambda s: abs(s.start_ms - near_ms), default=None)
    return best if best is not None and abs(best.start_ms - near_ms) <= 2000 else None


def epoch_ms(iso: str | None) -> int | None:
    if iso is None:
        return None
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


# -- judging -----------------------------------------------------------------------------


@dataclass
class Verdicts:
    wrongful: list[dict[str, Any]] = field(default_factory=list)
    raced_in_act: list[dict[str, Any]] = field(default_factory=list)
    in_flight: list[dict[str, Any]] = field(default_factory=list)
    unrecorded_kills: list[dict[str, Any]] = field(default_factory=list)
    phantom: list[dict[str, Any]] = field(default_factory=list)
    deaths_without_record: list[dict[str, Any]] = field(default_factory=list)
    unexplained_deaths: list[dict[str, Any]] = field(default_factory=list)
    skipped_unchanged: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    lateness_ms: list[int] = field(default_factory=list)  # kill - state_change - threshold


def judge(records: list[dict[str, Any]], entries: list[Entry],
          sessions: dict[int, list[ServerSession]], lives: list[Life],
          threshold: float) -> Verdicts:
    v = Verdicts()
    thr_ms = round(threshold * 1000)
    act_entries = [e for e in entries if is_act(e)]
    acts = [e.pos for e in act_entries]
    by_session: dict[int, list[dict[str, Any]]] = {}  # id(ServerSession) -> its records
    session_of: dict[int, ServerSession] = {}

    for r in records:
        bs = epoch_ms(r["backend_start"])
        s = find_session(sessions, r["pid"], bs if bs is not None else 0)
        if s is None or bs is None:
            v.anomalies.append(f"record for pid {r['pid']} matches no session in the server log")
            continue
        by_session.setdefault(id(s), []).append(r)
        session_of[id(s)] = s
        sc = epoch_ms(r["state_change"])
        assert sc is not None
        ts = epoch_ms(r["ts"])
        assert ts is not None
        if r["outcome"] == "skipped_changed":
            if not any(e.ms > sc and e.ms <= ts + 1 for e in s.events) and not (
                s.fatal is not None and s.fatal.ms <= ts + 1):
                v.skipped_unchanged.append(r)
            continue
        if not signalled(r):
            continue
        base = {"pid": r["pid"], "state": r["state"], "state_change": r["state_change"],
                "ts": r["ts"], "sweep": r["sweep"], "outcome": r["outcome"]}
        if s.fatal is None or KILLED not in s.fatal.text:
            if r["outcome"] == "terminated":
                v.phantom.append(base)
            continue
        kill = s.fatal
        i = bisect.bisect_left(acts, kill.pos) - 1
        if i < 0:
            v.anomalies.append(f"pid {r['pid']} killed before any ACT statement")
            continue
        act_pos, act_ms = acts[i], act_entries[i].ms
        after_sc = [e for e in s.events if e.ms > sc and e.pos < kill.pos]
        before_act = [e for e in after_sc if e.pos < act_pos]
        why = []
        if before_act:
            e = before_act[0]
            why.append(f"{e.kind} of {e.sql!r} at +{e.ms - sc} ms after state_change, "
                       "before the ACT statement began")
        state = s.state_at(act_pos)
        if state != r["state"]:
            why.append(f"server-side state {state!r} when the ACT began, record says "
                       f"{r['state']!r}")
        if kill.ms - sc < thr_ms - 1:
            why.append(f"killed {kill.ms - sc} ms after state_change (threshold {thr_ms} ms)")
        if ts - sc < thr_ms:
            why.append(f"record ts only {ts - sc} ms after state_change")
        v.lateness_ms.append(kill.ms - sc - thr_ms)
        if why:
            v.wrongful.append(base | {"why": why})
        elif after_sc:
            e = after_sc[0]
            v.raced_in_act.append(base | {"sql": e.sql, "after_act_began_ms": e.ms - act_ms,
                                          "before_kill_ms": kill.ms - e.ms})

    for plist in sessions.values():
        for s in plist:
            if s.fatal is None or KILLED not in s.fatal.text:
                continue
            recs = [r for r in by_session.get(id(s), []) if signalled(r)]
            if not recs:
                v.unrecorded_kills.append({"pid": s.pid, "killed_ms": s.fatal.ms})

    # The clients' view: every connection that died was killed by the watchdog, on the record.
    for life in lives:
        if life.died is None:
            continue
        s = find_session(sessions, life.pid, round(life.opened * 1000))
        if s is None:
            v.unexplained_deaths.append({"pid": life.pid, "death": life.death})
            continue
        if s.fatal is None or KILLED not in s.fatal.text:
            v.unexplained_deaths.append({"pid": life.pid, "death": life.death,
                                         "fatal": s.fatal.text if s.fatal else None})
            continue
        if not [r for r in by_session.get(id(s), []) if signalled(r)]:
            v.deaths_without_record.append({"pid": life.pid, "died": life.died})
        last = life.statements[-1] if life.statements else None
        if last is None or last.done is not None:
            continue
        # Sent (client clock) before the backend died (server clock, same host), and the
        # server never logged it after the judged state_change: in flight at the kill.
        recs = [r for r in by_session.get(id(s), []) if signalled(r)]
        sc = epoch_ms(recs[-1]["state_change"]) if recs else None
        seen = sc is not None and any(e.ms > sc and e.kind == "start" for e in s.events)
        sent_ms = last.sent * 1000
        if sent_ms <= s.fatal.ms + 1 and not seen:
            v.in_flight.append({"pid": life.pid, "sql": last.sql,
                                "sent_before_kill_ms": round(s.fatal.ms - sent_ms, 1)})
    return v


# -- the run -----------------------------------------------------------------------------


@dataclass
class Result:
    major: int
    mode: str
    clients: int
    threshold_s: float
    interval_s: float
    act_delay_s: float
    unsafe_act: bool
    duration_s: float
    sweeps: int
    sweeps_in_server_log: int
    sweep_errors: int
    sessions: int
    statements_sent: int
    statements_logged: int
    outcomes: dict[str, int]
    kills_in_server_log: int
    client_deaths: int
    wrongful: int
    raced_in_act: int
    in_flight_at_kill: int
    unrecorded_kills: int
    phantom_terminations: int
    deaths_without_record: int
    unexplained_deaths: int
    skipped_without_visible_change: int
    anomalies: int
    lateness_ms: dict[str, float]
    details: dict[str, Any]

    def problems(self) -> list[str]:
        """What makes this run a failure (empty if it passed)."""
        bad = {
            "wrongful kills": self.wrongful,
            "kills without an audit record": self.unrecorded_kills,
            "'terminated' records without a kill": self.phantom_terminations,
            "client deaths without an audit record": self.deaths_without_record,
            "client deaths the server log does not explain": self.unexplained_deaths,
            "log/record anomalies": self.anomalies,
        }
        return [f"{n} {what}" for what, n in bad.items() if n]

    def report(self) -> str:
        lat = self.lateness_ms
        lines = [
            f"race soak: PostgreSQL {self.major}, {self.mode}, {self.clients} clients, "
            f"threshold {self.threshold_s:g}s, interval {self.interval_s:g}s"
            + (f", act delay up to {self.act_delay_s:g}s" if self.act_delay_s else "")
            + (", UNSAFE ACT (race check removed)" if self.unsafe_act else ""),
            f"  duration            {self.duration_s:.1f} s",
            f"  sweeps              {self.sweeps} (server log: {self.sweeps_in_server_log}, "
            f"errors {self.sweep_errors})",
            f"  sessions            {self.sessions}",
            f"  statements          {self.statements_sent} sent, {self.statements_logged} "
            "started in the server log",
            f"  audit outcomes      {dict(sorted(self.outcomes.items()))}",
            f"  terminations        {self.outcomes.get('terminated', 0)} records, "
            f"{self.kills_in_server_log} kills in the server log, "
            f"{self.client_deaths} client deaths",
            f"  skipped_changed     {self.outcomes.get('skipped_changed', 0)} "
            f"({self.skipped_without_visible_change} without a visible change)",
            f"  wrongful kills      {self.wrongful}",
            f"  raced in ACT        {self.raced_in_act} (read by the server between the ACT's "
            "look and its signal)",
            f"  in flight at kill   {self.in_flight_at_kill} (sent, never read by the server)",
            f"  unrecorded kills    {self.unrecorded_kills}; phantom terminations "
            f"{self.phantom_terminations}; deaths without record {self.deaths_without_record}; "
            f"unexplained deaths {self.unexplained_deaths}; anomalies {self.anomalies}",
        ]
        if lat:
            lines.append(
                "  kill after threshold  min {min:.0f} / p50 {p50:.0f} / p99 {p99:.0f} / "
                "max {max:.0f} ms (server clock, kill - state_change - threshold)".format(**lat)
            )
        return "\n".join(lines)


def _lateness(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    return {"min": values[0], "p50": statistics.median(values),
            "p99": values[min(len(values) - 1, int(len(values) * 0.99))], "max": values[-1]}


def setup_cluster_roles(cluster: TempCluster) -> None:
    sql = ("CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO watchdog; "
           "CREATE ROLE app LOGIN;")
    if cluster.major >= 16:
        sql += " GRANT pg_use_reserved_connections TO watchdog;"
    cluster.psql(sql)


async def soak(cluster: TempCluster, workdir: Path, *, clients: int = 40, sweeps: int = 3000,
               duration: float = 3600.0, threshold: float = 1.0, interval: float = 0.05,
               mode: str = "inproc", act_delay: float = 0.0, unsafe_act: bool = False,
               seed: int | None = None) -> Result:
    """Run the soak against a started ``cluster`` (with LOG_SETTINGS and roles app/watchdog)."""
    if mode == "daemon" and (act_delay or unsafe_act):
        raise ValueError("--act-delay and --unsafe-act only patch this process (--mode inproc)")
    rng = random.Random(seed)
    audit = workdir / "audit.jsonl"
    interval_text = f"{round(interval * 1000)}ms" if mode == "daemon" else "1s"
    policy = write_policy(workdir / "soak.yaml", cluster, audit, interval_text, threshold)
    stats: Counter[str] = Counter()
    lives: list[Life] = []
    started = time.time()
    stop_at = started + duration
    with patched(unsafe_act, act_delay, random.Random(rng.random())):
        sweeper = (
            sweeper_inproc(policy, stop_at, sweeps, interval, stats) if mode == "inproc"
            else sweeper_daemon(policy, workdir / "daemon.log", cluster.log_path, stop_at,
                                sweeps, stats)
        )
        sweep_task = asyncio.create_task(sweeper)
        stop = Stop()
        dsn = cluster.dsn("app")
        tasks = [
            asyncio.create_task(client(i, dsn, stop, threshold, random.Random(rng.random()), lives))
            for i in range(clients)
        ]
        try:
            await sweep_task
        finally:
            stop.at = time.time()
            await asyncio.gather(*tasks)
    elapsed = time.time() - started
    await asyncio.sleep(0.3)  # let the last backends write their disconnection lines
    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()] \
        if audit.exists() else []
    entries, sessions = read_server_log(cluster.log_path)
    v = judge(records, entries, sessions, lives, threshold)
    kills = sum(1 for plist in sessions.values() for s in plist
                if s.fatal is not None and KILLED in s.fatal.text)
    return Result(
        major=cluster.major, mode=mode, clients=clients, threshold_s=threshold,
        interval_s=interval, act_delay_s=act_delay, unsafe_act=unsafe_act,
        duration_s=elapsed, sweeps=stats["sweeps"],
        sweeps_in_server_log=sum(1 for e in entries if is_snapshot(e)),
        sweep_errors=stats["sweep_errors"], sessions=len(lives),
        statements_sent=sum(len(life.statements) for life in lives),
        statements_logged=sum(
            1 for plist in sessions.values() for s in plist for e in s.events if e.kind == "start"
        ),
        outcomes=dict(Counter(r["outcome"] for r in records)),
        kills_in_server_log=kills,
        client_deaths=sum(1 for life in lives if life.died is not None),
        wrongful=len(v.wrongful), raced_in_act=len(v.raced_in_act),
        in_flight_at_kill=len(v.in_flight), unrecorded_kills=len(v.unrecorded_kills),
        phantom_terminations=len(v.phantom), deaths_without_record=len(v.deaths_without_record),
        unexplained_deaths=len(v.unexplained_deaths),
        skipped_without_visible_change=len(v.skipped_unchanged), anomalies=len(v.anomalies),
        lateness_ms=_lateness(v.lateness_ms),
        details={k: val[:20] for k, val in asdict(v).items() if k != "lateness_ms"},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--sweeps", type=int, default=3000, help="stop after this many sweeps")
    p.add_argument("--duration", type=float, default=3600.0, help="or after this many seconds")
    p.add_argument("--threshold", type=float, default=1.0, help="idle / idle-in-transaction, s")
    p.add_argument("--interval", type=float, default=None,
                   help="s between sweeps (inproc default 0.05; daemon 0.25, its floor)")
    p.add_argument("--mode", choices=("inproc", "daemon"), default="inproc")
    p.add_argument("--act-delay", type=float, default=0.0,
                   help="inproc: wait up to this long between look and ACT (widens the race)")
    p.add_argument("--unsafe-act", action="store_true",
                   help="inproc: remove the ACT's race check, to see the checker object")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    p.add_argument("--keep", action="store_true", help="keep the work directory and server log")
    args = p.parse_args(argv)
    interval = args.interval if args.interval is not None else (
        0.25 if args.mode == "daemon" else 0.05)
    workdir = Path(tempfile.mkdtemp(prefix="pg-watchdog-soak-"))
    os.chmod(workdir, 0o755)
    cluster = start_cluster(args.major, max_connections=args.clients + 20, settings=LOG_SETTINGS)
    try:
        setup_cluster_roles(cluster)
        result = asyncio.run(soak(
            cluster, workdir, clients=args.clients, sweeps=args.sweeps, duration=args.duration,
            threshold=args.threshold, interval=interval, mode=args.mode,
            act_delay=args.act_delay, unsafe_act=args.unsafe_act, seed=args.seed))
        if args.keep:
            import shutil

            shutil.copy(cluster.log_path, workdir / "postgresql.log")
    finally:
        cluster.cleanup()
    print(result.report())
    if args.json:
        print(json.dumps(asdict(result), indent=2, default=str))
    problems = result.problems()
    for what in problems:
        print(f"FAIL: {what}", file=sys.stderr)
    for kind in ("wrongful", "unrecorded_kills", "phantom", "deaths_without_record",
                 "unexplained_deaths", "anomalies", "raced_in_act", "in_flight"):
        for item in result.details.get(kind, [])[:5]:
            print(f"  {kind}: {item}", file=sys.stderr)
    if args.keep:
        print(f"work directory kept: {workdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
