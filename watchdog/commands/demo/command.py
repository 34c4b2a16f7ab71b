"""`pg-watchdog demo`: reproduce a connection-exhaustion incident on a throwaway server, heal it.

A leaky application fills every ordinary connection slot of a fresh PostgreSQL until new
connections fail with SQLSTATE 53300; then the real service runs in-process with the default
policies scaled down to seconds, and the demo narrates what it terminates and what it spares
until new connections succeed again. The server and the temporary directory are removed at
the end, also after Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from watchdog.commands import audit as audit_command
from watchdog.commands.demo.incident import APP, DemoError, Incident
from watchdog.commands.demo.tempcluster import ClusterError, find_bindir
from watchdog.config.policy import Config, load_config
from watchdog.config.units import parse_duration
from watchdog.config.vocab import State
from watchdog.core.decide import decide
from watchdog.core.model import APPLICATION_NAME, CLIENT_BACKEND, Snapshot
from watchdog.pg.snapshot import take_snapshot
from watchdog.service.scheduler import Service

# Thresholds of the seed policies, scaled from minutes to seconds: (idle, idle in transaction).
THRESHOLDS = {False: (6.0, 4.0), True: (2.0, 1.0)}
SCALED_NAMES = ("idle", "idle-in-transaction")
# The extras the demo's own (short-lived) environment must not reach: a demo never pages
# anyone through $SENTRY_DSN, nor talks to a systemd manager it does not belong to.
_FOREIGN_ENV = ("SENTRY_DSN", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _catch_signals_sync() -> None:
    """Outside the event loop, Ctrl-C and SIGTERM raise Interrupted (and cleanup follows)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Let cleanup finish: a second Ctrl-C must not leave a server behind."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def default_policies() -> tuple[dict[str, Any], str]:
    """The seed policy file as data, and where it came from."""
    sources = [
        # A wheel installs policies/default.yaml here (pyproject: data-files).
        Path(sys.prefix) / "share" / "pg-watchdog" / "default.yaml",
        # A checkout, or an editable install (this file is watchdog/commands/demo/command.py).
        Path(__file__).resolve().parents[3] / "policies" / "default.yaml",
    ]
    for source in sources:
        with contextlib.suppress(OSError, yaml.YAMLError):
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("policies"), list):
                return data, str(source)
    raise DemoError(f"the seed policy file is missing (looked in {', '.join(map(str, sources))})")


def demo_policy_text(dsn: str, audit: Path, fast: bool, interval: float = 1.0) -> str:
    """The seed policy file with its thresholds scaled to seconds, one target and a local log."""
    base, source = default_policies()
    scaled = dict(zip(SCALED_NAMES, THRESHOLDS[fast], strict=True))
    policies = []
    for seed in base["policies"]:
        policy = dict(seed)
        if policy.get("name") in scaled:
            policy["longer_than"] = f"{scaled[policy['name']]:g}s"
        else:  # any other seed rule: minutes -> seconds
            with contextlib.suppress(ValueError, TypeError):
                seconds = parse_duration(policy["longer_than"]) / 100
                policy["longer_than"] = f"{max(seconds, 1):g}s"
        policies.append(policy)
    doc = {
        "dry_run": False,
        "targets": [{"name": "demo", "dsn": dsn, "interval": f"{interval:g}s"}],
        "exclude": base.get("exclude", {"superusers": True}),
        "policies": policies,
        "limits": base.get("limits", {"max_per_sweep": 50}),
        "audit": {"path": str(audit), "query": "truncate"},
        "alerts": {"connections_above": "80%"},
    }
    head = f"# pg-watchdog demo: derived from {source}, thresholds scaled to seconds.\n"
    return head + yaml.safe_dump(doc, sort_keys=False)


class Demo(Incident):
    """One run of the demo: the cluster, the sessions, the narration."""

    # -- the healing -------------------------------------------------------------

    async def observe(self, observer: Any, config: Config) -> Snapshot:
        """Narrate the sessions the policies spare (once each), from the same decision."""
        snap = await take_snapshot(observer, 5, config.member_roles())
        decision = decide(snap, config, "demo")
        waiting = [v for v in decision.verdicts if v.policy is not None and not v.acting]
        if waiting and not self.announced:
            self.announced = True
            self.say(
                f"not yet due: {len(waiting)} sessions; the next crosses its threshold "
                f"in {decision.next_due or 0:.1f}s"
            )
        for v in decision.verdicts:
            s = v.session
            if (
                v.policy is not None
                or s.pid in self.spared
                or s.pid == snap.own_pid
                or s.backend_type != CLIENT_BACKEND
                or s.application_name == APPLICATION_NAME
            ):
                continue
            self.spared.add(s.pid)
            age = (snap.now - s.state_change).total_seconds() if s.state_change else 0.0
            self.say(
                f"spares     pid {s.pid} ({s.usename}, '{s.application_name}', "
                f"{s.state} for {age:.1f}s): {v.reason}"
            )
        return snap

    def narrate_audit(self, config: Config) -> None:
        if not self.audit.exists():
            return
        with self.audit.open("rb") as f:
            f.seek(self.audit_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.audit_offset += len(complete)
        limits = {p.name: p.longer_than for p in config.policies}
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                err = f" ({r['error']})" if r.get("error") else ""
                self.say(
                    f"{r['outcome']:<10} pid {r['pid']} ({r['usename']}, "
                    f"'{r['application_name']}', {r['state']} for {r['age_s']:.1f}s > "
                    f"{limits.get(r['policy'], 0):g}s: policy {r['policy']}){err}"
                )

    async def probe(self, snap: Snapshot) -> bool:
        """Whether a new ordinary connection succeeds (it is closed at once)."""
        assert self.cluster is not None
        try:
            conn = await asyncpg.connect(
                self.cluster.dsn("app"), timeout=5, server_settings={"application_name": APP}
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != "53300":
                raise
            return False
        await conn.close()
        self.say(
            f"{APP} connects again: a new ordinary connection succeeds "
            f"({snap.used}/{snap.capacity} ordinary slots in use)"
        )
        return True

    async def heal(self, observer: Any) -> None:
        assert self.cluster is not None
        snap = await take_snapshot(observer, timeout=5)
        self.say(f"the server is full: {snap.used}/{snap.capacity} ordinary slots in use")
        policy = self.tmp / "policies.yaml"
        who = "watchdog" if self.major >= 16 else "postgres"
        policy.write_text(demo_policy_text(self.cluster.dsn(who), self.audit, self.fast))
        config = load_config(str(policy))
        rules = ", ".join(f"{p.name} > {p.longer_than:g}s" for p in config.policies)
        self.say(
            f"starting pg-watchdog as role {who} with {policy.name}: {rules}, "
            f"sweeping every {config.targets[0].interval:g}s"
        )
        if who == "postgres":
            self.say(
                "(PostgreSQL 15 has no pg_use_reserved_connections: connecting when full "
                "takes a superuser; in production keep the watchdog running beforehand)"
            )
        for name in _FOREIGN_ENV:
            os.environ.pop(name, None)
        service = Service(config, str(policy), dry_run=False)
        task = asyncio.create_task(service.run())
        deadline = time.monotonic() + max(THRESHOLDS[self.fast]) + 30
        healed = False
        try:
            while True:
                await asyncio.sleep(0.1)
                if service.stop.is_set():  # its own SIGINT/SIGTERM handlers took the signal
                    raise Interrupted("signal")
                if task.done():
                    task.result()
                    raise DemoError("pg-watchdog stopped unexpectedly")
                self.narrate_audit(config)
                snap = await self.observe(observer, config)
                healed = healed or await self.probe(snap)
                leaked = [s for s in snap.sessions
                          if s.application_name == APP and s.state != State.ACTIVE]
                if healed and not leaked:
                    break
                if time.monotonic() > deadline:
                    raise DemoError(f"{len(leaked)} leaked sessions still there; giving up")
        finally:
            service.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            self.narrate_audit(config)
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._catch_signals()  # the service had taken SIGINT and SIGTERM over
        snap = await take_snapshot(observer, timeout=5)
        self.say(
            f"healed: every leaked idle session is gone, {snap.used}/{snap.capacity} "
            "ordinary slots in use; the spared sessions are still there"
        )

    def _catch_signals(self) -> None:
        # In the event loop a signal cancels the main task, so every finally runs.
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)

    async def main(self) -> None:
        self._catch_signals()
        try:
            observer = await self.incident()
            await self.heal(observer)
        finally:
            for conn in self.conns:
                conn.terminate()
            if self.report is not None:
                self.report.cancel()
                with contextlib.suppress(BaseException):
                    await self.report

    def summary(self) -> None:
        print(f"\n$ pg-watchdog audit --file {self.audit} --summary", flush=True)
        parser = argparse.ArgumentParser(prog="pg-watchdog audit")
        audit_command.configure_parser(parser)
        audit_command.run(
            parser.parse_args(["--file", str(self.audit), "--summary"]), lambda _: self.audit
        )
        sys.stdout.flush()

    def advice(self) -> None:
        """From relief to cure: `advise` on the incident's audit log and the server still up."""
        from watchdog.commands.advise.command import configure_parser as configure_advise
        from watchdog.commands.advise.command import run_advise

        policy = self.tmp / "policies.yaml"
        print(f"\n$ pg-watchdog advise -c {policy}", flush=True)
        parser = argparse.ArgumentParser(prog="pg-watchdog advise")
        configure_advise(parser)
        run_advise(load_config(str(policy)), parser.parse_args([]))
        sys.stdout.flush()


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of `pg-watchdog demo`: 0 when the incident was reproduced and healed."""
    major = int(getattr(args, "major", 18))
    try:
        find_bindir(major)  # before any narration: a slim install says how to get a server
    except ClusterError as exc:
        print(f"pg-watchdog demo: {exc}", file=sys.stderr, flush=True)
        return 1
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    demo = Demo(major, bool(getattr(args, "fast", False)))
    code = 0
    try:
        _catch_signals_sync()
        demo.start_server()
        try:
            asyncio.run(demo.main())
        finally:
            _catch_signals_sync()  # closing the loop restored the default handlers
        demo.summary()
        demo.advice()
    except (Interrupted, KeyboardInterrupt, asyncio.CancelledError):
        print("\npg-watchdog demo: interrupted; cleaning up", file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:
        raise  # the reader went away (`| head`): cleaned up below, then ended quietly by cli
    except (DemoError, ClusterError, OSError, asyncpg.PostgresError) as exc:
        print(f"pg-watchdog demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        with _signals_held():
            demo.cleanup()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code
