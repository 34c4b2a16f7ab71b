"""Prometheus metrics (opt-in with ``metrics: {listen: HOST:PORT}``).

The metrics live in a registry of their own, not prometheus-client's global
one, so nothing else in the process leaks into the scrape. Without a
``metrics`` section every method returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter as Tally
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from watchdog.alerts.health import Health, serve
from watchdog.config.policy import STATES, Config
from watchdog.core.model import Result
from watchdog.text.errors import reason as error_reason

if TYPE_CHECKING:
    from watchdog.alerts.report import Swept
    from watchdog.core.forecast import Forecast

log = logging.getLogger("watchdog.metrics")  # the name log filters know

OTHER = "other"  # sessions whose state pg_stat_activity does not show (NULL)
# Created at 0 for every policy of a target, so the first failure is an increase() that
# alert rules see (a series born at 1 has no earlier sample to compare with).
ALWAYS_OUTCOMES = (Result.FAILED, Result.UNCONFIRMED)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)


class Metrics:
    """Counts sweeps and actions and exposes each target's connections."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.enabled = config.metrics is not None
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._states: dict[str, set[str]] = {}  # target -> state labels it has exported
        self._acted: dict[str, set[tuple[str, str]]] = {}  # target -> (policy, outcome) labels
        r = self.registry
        self.actions = Counter(
            "pg_watchdog_actions",
            "Sessions acted on (or that would be, in a dry run), by outcome.",
            ["target", "policy", "outcome"],
            registry=r,
        )
        self.sweeps = Counter("pg_watchdog_sweeps", "Sweeps completed.", ["target"], registry=r)
        self.duration = Histogram(
            "pg_watchdog_sweep_duration_seconds",
            "Time one sweep took: snapshot, decision, signals and audit.",
            ["target"],
            buckets=BUCKETS,
            registry=r,
        )
        self.up = Gauge(
            "pg_watchdog_target_up",
            "1 while the monitoring connection to the target is open.",
            ["target"],
            registry=r,
        )
        self.leader = Gauge(
            "pg_watchdog_leader",
            "1 while this instance holds the target's leader lock and acts on it.",
            ["target"],
            registry=r,
        )
        self.connections = Gauge(
            "pg_watchdog_connections",
            "Client sessions by pg_stat_activity state at the last sweep.",
            ["target", "state"],
            registry=r,
        )
        self.last_sweep = Gauge(
            "pg_watchdog_last_sweep_timestamp_seconds",
            "Unix time at which the target's last sweep completed.",
            ["target"],
            registry=r,
        )
        self.interval = Gauge(
            "pg_watchdog_interval_seconds",
            "The target's configured interval: the longest wait between two sweeps.",
            ["target"],
            registry=r,
        )
        self.alert_ratio = Gauge(
            "pg_watchdog_connections_alert_ratio",
            "alerts.connections_above: the share of connection slots in use that alerts.",
            ["target"],
            registry=r,
        )
        self.max_connections = Gauge(
            "pg_watchdog_max_connections", "The server's max_connections.", ["target"], registry=r
        )
        self.slots = Gauge(
            "pg_watchdog_connection_slots",
            "Slots an ordinary role can use: max_connections minus the reserved ones.",
            ["target"],
            registry=r,
        )
        self.exhaustion_eta = Gauge(
            "pg_watchdog_exhaustion_eta_seconds",
            "Forecast: seconds until the ordinary slots run out at the current rate of growth;"
            " absent while the client count is not growing.",
            ["target"],
            registry=r,
        )
        self._pooler_gauges(r)

    def start(self, health: Health | None = None) -> None:
        """Serve the metrics (and, given a service, its /healthz and /readyz) on the configured
        address; a failure to bind is logged, not fatal."""
        m = self.config.metrics
        if m is None or self._server is not None:
            return
        try:
            self._server, self._thread = serve(m.host, m.port, self.registry, health)
        except OSError as exc:
            log.error(
                "metrics off: cannot listen on %s:%d: %s", m.host, m.port, error_reason(exc)
            )
            return
        log.info("serving Prometheus metrics on http://%s:%d/metrics", m.host, m.port)

    def configure(self, config: Config) -> None:
        """Apply a reloaded config: forget targets that are gone (the address needs a restart)."""
        if self.enabled and config.metrics != self.config.metrics:
            log.warning("metrics.listen changed; restart pg-watchdog to apply it")
        self.config = config
        if not self.enabled:
            return
        names = {t.name for t in config.targets}
        for target in [t for t in {*self._states, *self._acted} if t not in names]:
            self.forget(target)

    def forget(self, target: str) -> None:
        """Drop every series of a target."""
        states = self._states.pop(target, set())
        for metric in (
            self.sweeps,
            self.duration,
            self.up,
            self.leader,
            self.last_sweep,
            self.interval,
            self.max_connections,
            self.slots,
            self.alert_ratio,
            self.exhaustion_eta,
        ):
            metric.remove(target)  # a no-op for a series never written
        for state in states:
            self.connections.remove(target, state)
        for policy, outcome in self._acted.pop(target, set()):
            self.actions.remove(target, policy, outcome)
        self._forget_poolers(target)

    def swept(self, report: Swept) -> None:
        """Count one sweep's actions and record the target's connections."""
        if not self.enabled:
            return
        target, snap = report.target, report.snapshot
        self.sweeps.labels(target).inc()
        self.duration.labels(target).observe(report.duration)
        self.last_sweep.labels(target).set(time.time())
        self.leader.labels(target).set(1 if report.leader else 0)
        acted = self._acted.setdefault(target, set())
        for policy in self.config.policies:
            if policy.targets is not None and target not in policy.targets:
                continue
            for outcome in ALWAYS_OUTCOMES:
                if (policy.name, outcome) not in acted:
                    self.actions.labels(target, policy.name, outcome)
                    acted.add((policy.name, outcome))
        for o in report.outcomes:
            self.actions.labels(target, o.action.policy, o.outcome).inc()
            acted.add((o.action.policy, o.outcome))
        counts = Tally(s.state or OTHER for s in snap.clients)
        # Every state is written each sweep, so one that vanished reads 0, not its last value.
        states = self._states.setdefault(target, set()) | {*STATES, OTHER, *counts}
        self._states[target] = states
        for state in states:
            self.connections.labels(target, state).set(counts.get(state, 0))
        self.max_connections.labels(target).set(snap.max_connections)
        self.slots.labels(target).set(snap.capacity)

    def exhaustion(self, target: str, fc: Forecast | None) -> None:
        """The forecast's estimate, or no series while the counts are not growing."""
        if not self.enabled:
            return
        if fc is not None and fc.eta_s is not None:
            self.exhaustion_eta.labels(target).set(round(fc.eta_s, 1))
        else:
            self.exhaustion_eta.remove(target)

    # -- PgBouncer pools (targets with poolers) -------------------------------------------

    def _pooler_gauges(self, r: CollectorRegistry) -> None:
        pool = ["target", "pooler", "database", "user"]
        self._pools: dict[tuple[str, str], set[tuple[str, str]]] = {}  # -> (database, user)
        self.pool_gauges = {
            field: Gauge(f"pg_watchdog_pooler_{name}", text, pool, registry=r)
            for field, name, text in (
                ("cl_waiting", "clients_waiting", "Clients queued for a server connection."),
                ("cl_active", "clients_active", "Clients linked to a server or idle."),
                ("sv_active", "servers_active", "Server connections linked to a client."),
                ("sv_idle", "servers_idle", "Server connections idle in the pool."),
                ("maxwait_s", "maxwait_seconds", "How long the oldest queued client has waited."),
            )
        }
        pooler = ["target", "pooler"]
        self.pooler_clients = Gauge(
            "pg_watchdog_pooler_clients", "Client connections to the pooler.", pooler, registry=r
        )
        self.pooler_max_clients = Gauge(
            "pg_watchdog_pooler_max_client_conn",
            "The pooler's max_client_conn.",
            pooler,
            registry=r,
        )
        self.pooler_up = Gauge(
            "pg_watchdog_pooler_up",
            "1 while the pooler's admin console answered the last sweep.",
            pooler,
            registry=r,
        )
        self.pooler_dropped = Counter(
            "pg_watchdog_pooler_rows_dropped",
            "Rows of the pooler's console answers that did not fit and were dropped.",
            pooler,
            registry=r,
        )

    def _drop_pools(self, target: str, pooler: str, keep: set[tuple[str, str]]) -> None:
        for db, user in self._pools.get((target, pooler), set()) - keep:
            for g in self.pool_gauges.values():
                g.remove(target, pooler, db, user)
        self._pools[(target, pooler)] = keep

    def _forget_poolers(self, target: str, keep: set[str] | None = None) -> None:
        for t, pooler in [k for k in self._pools if k[0] == target and k[1] not in (keep or ())]:
            self._drop_pools(t, pooler, set())
            del self._pools[(t, pooler)]
            for g in (self.pooler_clients, self.pooler_max_clients, self.pooler_up,
                      self.pooler_dropped):
                with contextlib.suppress(KeyError):
                    g.remove(t, pooler)

    def pooled(self, report: Swept) -> None:
        """Each pooler's pools, clients and limit as its read this sweep showed them."""
        if not self.enabled:
            return
        target, looks = report.target, report.poolers.looks
        # A pooler a reload removed from the target: its series go.
        self._forget_poolers(target, keep={*report.poolers.errors, *(x.name for x in looks)})
        for name, rows in report.poolers.dropped.items():
            self.pooler_dropped.labels(target, name).inc(rows)
        for look in looks:
            self.pooler_up.labels(target, look.name).set(1)
            self.pooler_clients.labels(target, look.name).set(look.clients_used)
            if look.max_client_conn is not None:
                self.pooler_max_clients.labels(target, look.name).set(look.max_client_conn)
            seen: set[tuple[str, str]] = set()
            # SHOW POOLS counts no login: a client that never authenticated names no series.
            for p in look.pools():
                seen.add((p.database, p.user))
                for field, g in self.pool_gauges.items():
                    g.labels(target, look.name, p.database, p.user).set(getattr(p, field))
            self._drop_pools(target, look.name, seen)
        for pooler in report.poolers.errors:
            # Stale pool figures would mislead: only pooler_up says anything while it is down.
            self.pooler_up.labels(target, pooler).set(0)
            self._drop_pools(target, pooler, set())

    def target_up(self, target: str, up: bool, leader: bool) -> None:
        """Whether a target is reachable, and whether this instance acts on it."""
        if not self.enabled:
            return
        self._states.setdefault(target, set())
        self.up.labels(target).set(1 if up else 0)
        self.leader.labels(target).set(1 if leader else 0)
        with contextlib.suppress(StopIteration):  # a target removed by a reload in between
            self.interval.labels(target).set(self.config.target(target).interval)
        ratio = self.config.alerts.connections_above
        if ratio is not None:
            self.alert_ratio.labels(target).set(ratio)
        else:
            self.alert_ratio.remove(target)

    def close(self) -> None:
        """Stop serving."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
