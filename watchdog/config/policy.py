"""The policy file: strict validation into frozen dataclasses.

Everything the rest of the code trusts is checked here, once, at the edge.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from watchdog.config import conninfo
from watchdog.config.vocab import RUNNING, Signal, State
from watchdog.config.yamlfields import (
    Network,
    boolean,
    choice,
    cidr_list,
    duration,
    ident,
    kind,
    list_of,
    mapping,
    opt,
    percent,
    str_list,
    string,
)
from watchdog.config.yamlpos import MAX_BYTES, ConfigError, YNode, load_yaml
from watchdog.text.errors import reason as error_reason

T = TypeVar("T")

STATES = tuple(State)
ACTIONS = tuple(Signal)
MEASURED_FROM = ("state_change", "xact_start", "query_start", "backend_start")
AUDIT_QUERY = ("redact", "full", "truncate", "omit")
DEFAULT_CONFIG = "/etc/pg-watchdog/policies.yaml"
# The managed services' admin roles: their members are the DBAs there, and no superusers.
# Spared unless exclude.member_of says otherwise, as superusers are unless it says false.
PROVIDER_ADMIN_ROLES = ("rds_superuser", "azure_pg_admin", "cloudsqlsuperuser")
MIN_INTERVAL = 0.25
# The advisory lock the leader holds ('pgwd' in ASCII), unless the file sets lock_key.
LEADER_KEY = 0x70677764


@dataclass(frozen=True)
class PoolerConfig:
    """A PgBouncer in front of a target, read through its admin console."""

    name: str
    dsn: str


@dataclass(frozen=True)
class Target:
    name: str
    dsn: str
    password_file: Path | None
    interval: float
    poolers: tuple[PoolerConfig, ...] = ()


@dataclass(frozen=True)
class Exclusions:
    superusers: bool = False
    users: tuple[str, ...] = ()
    applications: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    client_addrs: tuple[Network, ...] = ()
    listeners: bool = False
    member_of: tuple[str, ...] = ()
    pooled: bool = False  # server connections a pooler holds with no client linked


@dataclass(frozen=True)
class Policy:
    name: str
    states: frozenset[str]
    longer_than: float
    action: Signal = Signal.TERMINATE
    measured_from: str = "state_change"
    users: tuple[str, ...] = ()
    applications: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    client_addrs: tuple[Network, ...] = ()
    exclude: Exclusions = Exclusions()
    dry_run: bool = False
    targets: tuple[str, ...] | None = None
    connections_above: float | None = None
    member_of: tuple[str, ...] = ()
    # Harm: match only sessions others wait on (for at least blocking_longer_than seconds).
    blocking: bool = False
    blocking_longer_than: float | None = None


@dataclass(frozen=True)
class Limits:
    max_per_sweep: int = 50


@dataclass(frozen=True)
class AuditConfig:
    path: Path = Path("/var/log/pg-watchdog/audit.jsonl")
    # redact: constants replaced by $n, the statement's shape kept (watchdog/text/redact.py)
    query: str = "redact"


@dataclass(frozen=True)
class SentryConfig:
    dsn: str | None = None
    environment: str = "production"
    # false: events carry no client addresses, role or application names
    send_session_details: bool = True


@dataclass(frozen=True)
class AlertsConfig:
    sentry: SentryConfig = SentryConfig()
    connections_above: float | None = 0.8
    pooler_wait_above: float = 1.0  # seconds a PgBouncer client may queue before an alert
    prepared_older_than: float = 3600.0  # seconds a prepared transaction may wait for 2PC
    # Alert when the forecast says the ordinary slots run out sooner than this (seconds).
    exhaustion_within: float = 600.0


@dataclass(frozen=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    source: str
    targets: tuple[Target, ...]
    policies: tuple[Policy, ...]
    exclude: Exclusions = Exclusions(
        superusers=True, listeners=True, pooled=True, member_of=PROVIDER_ADMIN_ROLES
    )
    dry_run: bool = False
    limits: Limits = Limits()
    audit: AuditConfig = AuditConfig()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig | None = None
    lock_key: int = LEADER_KEY

    def target(self, name: str) -> Target:
        """The target called ``name``."""
        return next(t for t in self.targets if t.name == name)

    def member_roles(self) -> tuple[str, ...]:
        """Every role a member_of rule names (global exclude, policy filters and excludes)."""
        names = {*self.exclude.member_of}
        for p in self.policies:
            names.update(p.member_of, p.exclude.member_of)
        return tuple(sorted(names))


def config_path(arg: str | None) -> str:
    """The policy file to use: ``-c``, then $PG_WATCHDOG_CONFIG, then the system default."""
    return arg or os.environ.get("PG_WATCHDOG_CONFIG") or DEFAULT_CONFIG


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a policy file; ConfigError (one line) on any problem."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more: the path may name /dev/zero
        if len(data) > MAX_BYTES:
            raise ConfigError(
                path, 1, 1, "", f"the policy file is larger than {MAX_BYTES // 1024} KiB"
                " (a policy file is a few KiB)"
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, 1, 1, "", f"cannot read policy file: {error_reason(exc)}") from None
    return parse_config(load_yaml(text, path, environ), path)


# -- sections ----------------------------------------------------------------

_EXCLUDE_KEYS = (
    "superusers", "users", "applications", "databases", "client_addrs", "listeners", "member_of",
    "pooled",
)
_FILTER_KEYS = ("users", "applications", "databases", "client_addrs", "member_of")
_NAMEDATALEN = 64


def _role_name(node: YNode) -> str:
    value = string(node)
    if not value:
        raise node.error("a role name must not be empty")
    if any(c in value for c in "*?["):
        # users/applications take globs; a glob here would silently match no role.
        raise node.error(f"{value!r}: role names are not globs; list each role by its exact name")
    if len(value.encode()) >= _NAMEDATALEN:
        raise node.error(f"{value!r} is longer than PostgreSQL's {_NAMEDATALEN - 1}-byte names")
    return value


def _role_list(node: YNode) -> tuple[str, ...]:
    return list_of(node, _role_name)


def _exclusions(node: YNode, defaults: Exclusions) -> Exclusions:
    f = mapping(node, _EXCLUDE_KEYS)
    return Exclusions(
        superusers=opt(f, "superusers", boolean, defaults.superusers),
        users=opt(f, "users", str_list, ()),
        applications=opt(f, "applications", str_list, ()),
        databases=opt(f, "databases", str_list, ()),
        client_addrs=opt(f, "client_addrs", cidr_list, ()),
        listeners=opt(f, "listeners", boolean, defaults.listeners),
        member_of=opt(f, "member_of", _role_list, defaults.member_of),
        pooled=opt(f, "pooled", boolean, defaults.pooled),
    )


def _dsn(node: YNode) -> str:
    value = string(node)
    try:
        conninfo.validate(value)
    except conninfo.ConninfoError as exc:
        # Point at the key inside the value when the value is written as is on one line.
        inside = node.text_col is not None and exc.offset is not None
        col = node.text_col + exc.offset if inside else node.col  # type: ignore[operator]
        raise ConfigError(node.file, node.line, col, node.path, exc.message) from None
    return value


def _interval(node: YNode) -> float:
    seconds = duration(node)
    if seconds < MIN_INTERVAL:
        raise node.error(f"{node.value!r} is too short (at least {MIN_INTERVAL * 1000:.0f}ms)")
    return seconds


def _path(node: YNode) -> Path:
    value = string(node)
    if not value:
        raise node.error("must not be empty")
    if "\0" in value:
        # The OS cannot open such a path: say so here rather than fail at the first sweep.
        raise node.error(f"{value!r} contains a NUL character")
    return Path(value).expanduser()


def _pooler_dsn(node: YNode) -> str:
    value = _dsn(node)
    if not value:
        raise node.error("must not be empty (e.g. postgresql://watchdog@10.0.0.5:6432/pgbouncer)")
    try:
        database = urlsplit(value).path.lstrip("/")
    except ValueError as exc:
        raise node.error(f"is not a valid URI: {exc}") from None
    if database != "pgbouncer":
        # The admin console is the only database where SHOW SOCKETS works.
        raise node.error(
            f"must name PgBouncer's admin database pgbouncer, not {database or 'none'!r}"
            " (e.g. postgresql://watchdog@10.0.0.5:6432/pgbouncer)"
        )
    return value


def _pooler(node: YNode) -> PoolerConfig:
    f = mapping(node, ("name", "dsn"), ("name", "dsn"))
    return PoolerConfig(name=ident(f["name"]), dsn=_pooler_dsn(f["dsn"]))


def _poolers(node: YNode) -> tuple[PoolerConfig, ...]:
    poolers = list_of(node, _pooler, allow_scalar=False)
    _unique(poolers, node.value, lambda p: p.name, "pooler")
    return poolers


def _target(node: YNode) -> Target:
    f = mapping(node, ("name", "dsn", "password_file", "interval", "poolers"), ("name",))
    return Target(
        name=ident(f["name"]),
        dsn=opt(f, "dsn", _dsn, ""),
        password_file=opt(f, "password_file", _path, None),
        interval=opt(f, "interval", _interval, 30.0),
        poolers=opt(f, "poolers", _poolers, ()),
    )


def _when(node: YNode) -> float:
    f = mapping(node, ("connections_above",), ("connections_above",))
    return percent(f["connections_above"])


_POLICY_KEYS = (
    "name",
    "state",
    "longer_than",
    "action",
    "measured_from",
    *_FILTER_KEYS,
    "exclude",
    "dry_run",
    "targets",
    "when",
    "blocking",
    "blocking_longer_than",
)


def _blocking(f: dict[str, YNode]) -> tuple[bool, float | None]:
    """``blocking`` and ``blocking_longer_than``; the latter implies the former."""
    longer = opt(f, "blocking_longer_than", duration, None)
    if "blocking" not in f:
        return longer is not None, longer
    blocking = boolean(f["blocking"])
    if not blocking and longer is not None:
        raise f["blocking"].error(
            "blocking: false contradicts blocking_longer_than (which implies blocking: true)"
        )
    return blocking, longer


def _policy(node: YNode, target_names: set[str]) -> Policy:
    f = mapping(node, _POLICY_KEYS, ("name",))
    name = ident(f["name"])
    if "state" not in f:
        raise node.error(f"policy {name!r} has no 'state' (e.g. state: idle)")
    states = list_of(f["state"], choice(STATES))
    if not states:
        raise f["state"].error("must name at least one state")
    if "longer_than" not in f:
        raise node.error(f"policy {name!r} has no 'longer_than' (e.g. longer_than: 10m)")
    targets: tuple[str, ...] | None = None
    if "targets" in f:
        targets = list_of(f["targets"], string)
        if not targets:
            # An empty list would silently make the policy act nowhere.
            raise f["targets"].error("must name at least one target (leave it out for all targets)")
        for i, t in enumerate(targets):
            if t not in target_names:
                item = (
                    f["targets"].value[i] if isinstance(f["targets"].value, list) else f["targets"]
                )
                raise item.error(
                    f"unknown target {t!r} (targets: {', '.join(sorted(target_names))})"
                )
    action = Signal(opt(f, "action", choice(ACTIONS), "terminate"))
    if action == Signal.CANCEL and not set(states) <= RUNNING:
        # pg_cancel_backend only stops a running query: on a waiting session it does nothing.
        raise f["action"].error(
            "cancel only stops a running query; with idle states use terminate "
            "(or state: active)"
        )
    blocking, blocking_longer_than = _blocking(f)
    measured_from = opt(f, "measured_from", choice(MEASURED_FROM), "state_change")
    if measured_from == "xact_start" and State.IDLE in states:
        raise f["measured_from"].error(
            "an idle session has no open transaction, so xact_start never matches it"
        )
    return Policy(
        name=name,
        states=frozenset(states),
        longer_than=duration(f["longer_than"]),
        action=action,
        measured_from=measured_from,
        users=opt(f, "users", str_list, ()),
        applications=opt(f, "applications", str_list, ()),
        databases=opt(f, "databases", str_list, ()),
        client_addrs=opt(f, "client_addrs", cidr_list, ()),
        exclude=opt(f, "exclude", lambda n: _exclusions(n, Exclusions()), Exclusions()),
        dry_run=opt(f, "dry_run", boolean, False),
        targets=targets,
        connections_above=opt(f, "when", _when, None),
        member_of=opt(f, "member_of", _role_list, ()),
        blocking=blocking,
        blocking_longer_than=blocking_longer_than,
    )


def _unique(items: tuple[T, ...], nodes: list[YNode], key: Callable[[T], str], what: str) -> None:
    seen: set[str] = set()
    for item, node in zip(items, nodes, strict=True):
        k = key(item)
        if k in seen:
            name_node = node.value["name"] if isinstance(node.value, dict) else node
            raise name_node.error(f"duplicate {what} name {k!r}")
        seen.add(k)


def _limits(node: YNode) -> Limits:
    f = mapping(node, ("max_per_sweep",))
    if "max_per_sweep" not in f:
        return Limits()
    n = f["max_per_sweep"]
    if isinstance(n.value, bool) or not isinstance(n.value, int) or n.value < 1:
        raise n.error(f"must be a whole number of at least 1, not {n.value!r}")
    return Limits(max_per_sweep=n.value)


def _audit(node: YNode) -> AuditConfig:
    f = mapping(node, ("path", "query"))
    return AuditConfig(
        path=opt(f, "path", _path, AuditConfig.path),
        query=opt(f, "query", choice(AUDIT_QUERY), AuditConfig.query),
    )


def _sentry(node: YNode) -> SentryConfig:
    f = mapping(node, ("dsn", "environment", "send_session_details"))
    dsn = opt(f, "dsn", lambda n: "" if n.value is None else string(n), "")
    if dsn and not re.match(r"https?://[^@/]+@[^/]+/\S+", dsn):
        raise f["dsn"].error("is not a Sentry DSN (https://KEY@HOST/PROJECT)")
    return SentryConfig(
        dsn=dsn or None,
        environment=opt(f, "environment", string, "production"),
        send_session_details=opt(f, "send_session_details", boolean, True),
    )


def _alerts(node: YNode) -> AlertsConfig:
    f = mapping(
        node,
        ("sentry", "connections_above", "pooler_wait_above", "prepared_older_than",
         "exhaustion_within"),
    )
    return AlertsConfig(
        sentry=opt(f, "sentry", _sentry, SentryConfig()),
        connections_above=opt(f, "connections_above", percent, 0.8),
        pooler_wait_above=opt(f, "pooler_wait_above", duration, 1.0),
        prepared_older_than=opt(f, "prepared_older_than", duration, 3600.0),
        exhaustion_within=opt(f, "exhaustion_within", duration, 600.0),
    )


def _metrics(node: YNode) -> MetricsConfig:
    f = mapping(node, ("listen",), ("listen",))
    listen = string(f["listen"])
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise f["listen"].error(f"{listen!r} is not HOST:PORT (e.g. 127.0.0.1:9654)")
    return MetricsConfig(host=host.strip("[]") or "127.0.0.1", port=int(port))


def _lock_key(node: YNode) -> int:
    # pg_try_advisory_lock(bigint): any signed 64-bit integer. YAML's true is an int in
    # Python, and 1.5 or "42" are typos, never a key.
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int):
        raise node.error(f"must be an integer (a bigint advisory lock key), not {kind(v)}")
    if not -(2**63) <= v < 2**63:
        raise node.error(f"{v} is out of the bigint range (-2^63 to 2^63-1)")
    return v


_TOP_KEYS = (
    "dry_run",
    "lock_key",
    "targets",
    "exclude",
    "policies",
    "limits",
    "audit",
    "alerts",
    "metrics",
)


def parse_config(root: YNode, source: str) -> Config:
    """Validate a parsed policy file into a :class:`Config`."""
    if not isinstance(root.value, dict):
        raise root.error(
            f"the policy file must be a mapping (targets:, policies:, ...), not {kind(root.value)}"
        )
    f = mapping(root, _TOP_KEYS, ("targets", "policies"))
    target_nodes = f["targets"]
    targets = list_of(target_nodes, _target, allow_scalar=False)
    if not targets:
        raise target_nodes.error("must list at least one target")
    _unique(targets, target_nodes.value, lambda t: t.name, "target")
    names = {t.name for t in targets}
    policy_nodes = f["policies"]
    policies = list_of(policy_nodes, lambda n: _policy(n, names), allow_scalar=False)
    if not policies:
        raise policy_nodes.error("must list at least one policy")
    _unique(policies, policy_nodes.value, lambda p: p.name, "policy")
    return Config(
        source=source,
        targets=targets,
        policies=policies,
        exclude=opt(f, "exclude", lambda n: _exclusions(n, Config.exclude), Config.exclude),
        dry_run=opt(f, "dry_run", boolean, False),
        limits=opt(f, "limits", _limits, Limits()),
        audit=opt(f, "audit", _audit, AuditConfig()),
        alerts=opt(f, "alerts", _alerts, AlertsConfig()),
        metrics=opt(f, "metrics", _metrics, None),
        lock_key=opt(f, "lock_key", _lock_key, LEADER_KEY),
    )
