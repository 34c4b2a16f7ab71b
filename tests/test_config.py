"""Valid policy files: what they load into (the seed rules, units, ${VAR}, every optional key)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watchdog.config.policy import (
    DEFAULT_CONFIG,
    LEADER_KEY,
    MEASURED_FROM,
    STATES,
    Config,
    Exclusions,
    Target,
    config_path,
    load_config,
)
from watchdog.config.units import format_duration, parse_duration
from watchdog.config.yamlpos import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FILE = str(REPO / "policies" / "default.yaml")

TARGET = """\
targets:
  - name: main
    dsn: postgresql://watchdog@127.0.0.1:5432/postgres
"""


def write(tmp_path: Path, text: str, name: str = "policies.yaml") -> str:
    file = tmp_path / name
    file.write_text(text, encoding="utf-8")
    return str(file)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ={} if environ is None else environ)


def with_policy(body: str) -> str:
    """A file with one target and one policy whose keys are ``body`` (indented by 4)."""
    return TARGET + "policies:\n  - name: p\n" + body


# -- the shipped seed rules -------------------------------------------------------------


def test_default_file_loads_the_seed_rules() -> None:
    cfg = load_config(DEFAULT_FILE, environ={})
    assert cfg.source == DEFAULT_FILE
    assert cfg.dry_run is False
    assert cfg.targets == (
        Target("main", "postgresql://watchdog@127.0.0.1:5432/postgres", None, 30.0),
    )

    idle, iit = cfg.policies
    assert idle.name == "idle"
    assert idle.states == frozenset({"idle"})
    assert idle.longer_than == 600.0
    assert iit.name == "idle-in-transaction"
    assert iit.states == frozenset({"idle in transaction", "idle in transaction (aborted)"})
    assert iit.longer_than == 300.0
    for p in cfg.policies:
        assert p.action == "terminate"
        assert p.measured_from == "state_change"
        assert p.targets is None
        assert p.connections_above is None
        assert p.dry_run is False
        assert (p.users, p.applications, p.databases, p.client_addrs) == ((), (), (), ())
        assert p.exclude == Exclusions()

    assert cfg.exclude.superusers is True
    assert cfg.exclude.listeners is True
    assert cfg.exclude.applications == ("pg_dump*", "pg_basebackup", "psql")
    assert cfg.exclude.users == ()
    assert cfg.exclude.databases == ()
    assert cfg.exclude.client_addrs == ()

    assert cfg.limits.max_per_sweep == 50
    assert cfg.audit.query == "redact"
    assert cfg.audit.path == Path("/var/log/pg-watchdog/audit.jsonl")
    assert cfg.alerts.sentry.dsn is None
    assert cfg.alerts.sentry.environment == "production"
    assert cfg.alerts.sentry.send_session_details is True
    assert cfg.alerts.connections_above == pytest.approx(0.8)
    assert cfg.metrics is None


@pytest.mark.parametrize("environ", [{}, {"SENTRY_DSN": ""}], ids=["unset", "empty"])
def test_default_file_sentry_off_without_dsn(environ: dict[str, str]) -> None:
    assert load_config(DEFAULT_FILE, environ=environ).alerts.sentry.dsn is None


def test_default_file_sentry_on_with_dsn() -> None:
    dsn = "https://0123abcd@o42.ingest.sentry.io/4242"
    cfg = load_config(DEFAULT_FILE, environ={"SENTRY_DSN": dsn})
    assert cfg.alerts.sentry.dsn == dsn


def test_default_file_environment_overrides() -> None:
    cfg = load_config(
        DEFAULT_FILE,
        environ={
            "PG_WATCHDOG_DRY_RUN": "true",
            "PG_WATCHDOG_DSN": "postgresql://watchdog@db1.example.com:6432/app",
            "PG_WATCHDOG_AUDIT": "/srv/audit/pg.jsonl",
        },
    )
    assert cfg.dry_run is True
    assert cfg.targets[0].dsn == "postgresql://watchdog@db1.example.com:6432/app"
    assert cfg.audit.path == Path("/srv/audit/pg.jsonl")


def test_default_file_reads_os_environ_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_WATCHDOG_DRY_RUN", "true")
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    monkeypatch.delenv("PG_WATCHDOG_DSN", raising=False)
    monkeypatch.delenv("PG_WATCHDOG_AUDIT", raising=False)
    assert load_config(DEFAULT_FILE).dry_run is True


# -- durations -------------------------------------------------------------------------

DURATIONS = [
    ("500ms", 0.5),
    ("30s", 30.0),
    ("10m", 600.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("2d", 172800.0),
    ("1.5s", 1.5),
    ("1d2h3m4s5ms", 93784.005),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS, ids=[d[0] for d in DURATIONS])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10 minutes", "10", "ten", "5x", "1h30", "-5m", "", "m", "10M"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "seconds"), DURATIONS, ids=[d[0] for d in DURATIONS])
def test_durations_in_the_file(tmp_path: Path, text: str, seconds: float) -> None:
    cfg = load(tmp_path, with_policy(f"    state: idle\n    longer_than: {text}\n"))
    assert cfg.policies[0].longer_than == pytest.approx(seconds)


def test_interval_floor_is_250ms(tmp_path: Path) -> None:
    text = TARGET + "    interval: 250ms\npolicies: [{name: idle, state: idle, longer_than: 1m}]\n"
    assert load(tmp_path, text).targets[0].interval == 0.25


@given(
    h=st.integers(min_value=0, max_value=100_000),
    m=st.integers(min_value=0, max_value=59),
    s=st.integers(min_value=0, max_value=59),
)
def test_parse_duration_hms_roundtrip(h: int, m: int, s: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@given(st.dictionaries(st.sampled_from(sorted(UNITS)), st.integers(0, 10**6), min_size=1))
def test_parse_duration_sums_its_parts(parts: dict[str, int]) -> None:
    ordered = sorted(parts.items(), key=lambda p: -UNITS[p[0]])  # largest unit first
    text = "".join(f"{n}{unit}" for unit, n in ordered)
    assert parse_duration(text) == pytest.approx(sum(n * UNITS[u] for u, n in ordered))


@pytest.mark.parametrize("text", ["30m1h", "1m1m", "5s2m", "10ms1s"])
def test_parse_duration_rejects_units_out_of_order_or_repeated(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10 * 86400))
def test_format_duration_is_readable_by_parse_duration(seconds: int) -> None:
    # format_duration drops seconds past an hour (1h02m) and minutes past a day (3d04h),
    # but what it prints is always a valid duration.
    back = parse_duration(format_duration(seconds))
    if seconds < 3600:
        assert back == seconds
    else:
        assert 0 <= seconds - back < (60 if seconds < 86400 else 3600)


# -- ${VAR} expansion --------------------------------------------------------------------

DSN_FILE = """\
targets:
  - name: main
    dsn: ${DSN}
policies: [{name: idle, state: idle, longer_than: 10m}]
"""

DEFAULTED_DSN_FILE = DSN_FILE.replace("${DSN}", "${DSN:-postgresql://watchdog@db2/postgres}")


def test_env_set(tmp_path: Path) -> None:
    cfg = load(tmp_path, DSN_FILE, {"DSN": "postgresql://watchdog@db1:5432/postgres"})
    assert cfg.targets[0].dsn == "postgresql://watchdog@db1:5432/postgres"


def test_env_set_overrides_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, DEFAULTED_DSN_FILE, {"DSN": "postgresql://watchdog@db1/postgres"})
    assert cfg.targets[0].dsn == "postgresql://watchdog@db1/postgres"


@pytest.mark.parametrize("environ", [{}, {"DSN": ""}], ids=["unset", "empty"])
def test_env_default(tmp_path: Path, environ: dict[str, str]) -> None:
    cfg = load(tmp_path, DEFAULTED_DSN_FILE, environ)
    assert cfg.targets[0].dsn == "postgresql://watchdog@db2/postgres"


def test_env_unset_without_default_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, DSN_FILE)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:3:10: targets[0].dsn: environment variable DSN")


def test_env_inside_a_longer_string(tmp_path: Path) -> None:
    text = with_policy("    state: idle\n    longer_than: 10m\n")
    text += "audit:\n  path: ${LOGDIR:-/var/log/pg-watchdog}/audit-${HOST}.jsonl\n"
    cfg = load(tmp_path, text, {"HOST": "db1"})
    assert cfg.audit.path == Path("/var/log/pg-watchdog/audit-db1.jsonl")


def test_env_value_is_not_parsed_as_yaml(tmp_path: Path) -> None:
    text = with_policy("    state: idle\n    longer_than: 10m\n")
    text += "alerts:\n  sentry:\n    environment: ${ENV_NAME}\n"
    cfg = load(tmp_path, text, {"ENV_NAME": "prod # eu: [west]"})
    assert cfg.alerts.sentry.environment == "prod # eu: [west]"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, True), ({"DRY": "true"}, True), ({"DRY": "false"}, False), ({"DRY": ""}, True)],
    ids=["unset", "true", "false", "empty"],
)
def test_unquoted_env_becomes_a_boolean(
    tmp_path: Path, environ: dict[str, str], expected: bool
) -> None:
    text = "dry_run: ${DRY:-true}\n" + with_policy(
        "    state: idle\n    longer_than: 10m\n    dry_run: ${DRY:-true}\n"
    )
    cfg = load(tmp_path, text, environ)
    assert cfg.dry_run is expected
    assert cfg.policies[0].dry_run is expected


def test_quoted_env_stays_a_string(tmp_path: Path) -> None:
    text = with_policy("    state: idle\n    longer_than: 10m\n")
    text = text.replace("name: main", 'name: "${TARGET:-2024}"')
    text += 'alerts:\n  sentry:\n    environment: "${ENV_NAME:-true}"\n'
    cfg = load(tmp_path, text)
    assert cfg.alerts.sentry.environment == "true"
    assert cfg.targets[0].name == "2024"


def test_unquoted_env_that_reads_as_a_boolean_is_not_a_string(tmp_path: Path) -> None:
    # The other side of the coin: why the string above has to be quoted.
    text = with_policy("    state: idle\n    longer_than: 10m\n")
    text += "alerts:\n  sentry:\n    environment: ${ENV_NAME:-true}\n"
    with pytest.raises(ConfigError, match=r"alerts\.sentry\.environment: must be a string"):
        load(tmp_path, text)


def test_env_in_a_quoted_scalar_is_expanded(tmp_path: Path) -> None:
    text = DSN_FILE.replace("${DSN}", "'${DSN}'")
    cfg = load(tmp_path, text, {"DSN": "postgresql://watchdog@db1/postgres"})
    assert cfg.targets[0].dsn == "postgresql://watchdog@db1/postgres"


# -- policies --------------------------------------------------------------------------


def test_state_as_one_value(tmp_path: Path) -> None:
    cfg = load(
        tmp_path, with_policy("    state: active\n    longer_than: 1h\n    action: cancel\n")
    )
    assert cfg.policies[0].states == frozenset({"active"})
    assert cfg.policies[0].action == "cancel"


def test_state_as_a_list(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state:\n      - idle\n      - idle in transaction\n    longer_than: 1h\n"),
    )
    assert cfg.policies[0].states == frozenset({"idle", "idle in transaction"})


@pytest.mark.parametrize("state", STATES)
def test_every_state_is_accepted(tmp_path: Path, state: str) -> None:
    cfg = load(tmp_path, with_policy(f"    state: [{state}]\n    longer_than: 1h\n"))
    assert cfg.policies[0].states == frozenset({state})


@pytest.mark.parametrize("measured_from", MEASURED_FROM)
def test_measured_from(tmp_path: Path, measured_from: str) -> None:
    cfg = load(
        tmp_path,
        with_policy(
            "    state: idle in transaction\n    longer_than: 1h\n"
            f"    measured_from: {measured_from}\n"
        ),
    )
    assert cfg.policies[0].measured_from == measured_from


def test_per_policy_filters_and_exclude(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy(
            "    state: idle in transaction\n"
            "    longer_than: 2m\n"
            "    users: [app_*, reporting]\n"
            "    applications: rails\n"
            "    databases: [shop]\n"
            "    client_addrs: [10.0.0.0/8, 'fd00::/8']\n"
            "    exclude:\n"
            "      users: [replicator]\n"
            "      applications: [psql]\n"
            "      client_addrs: 10.1.2.3\n"
            "      superusers: true\n"
            "    dry_run: true\n"
        ),
    )
    p = cfg.policies[0]
    assert p.users == ("app_*", "reporting")
    assert p.applications == ("rails",)
    assert p.databases == ("shop",)
    assert p.client_addrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert p.exclude == Exclusions(
        superusers=True,
        users=("replicator",),
        applications=("psql",),
        client_addrs=(ipaddress.ip_network("10.1.2.3/32"),),
        listeners=False,
    )
    assert p.dry_run is True
    # The global exclusions are not touched by a policy's own.
    assert cfg.exclude == Config.exclude


def test_global_exclude_defaults_when_keys_omitted(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 10m\n") + "exclude:\n  users: [bob]\n",
    )
    assert cfg.exclude == Exclusions(
        superusers=True, users=("bob",), listeners=True, pooled=True,
        member_of=("rds_superuser", "azure_pg_admin", "cloudsqlsuperuser"),
    )


def test_global_exclude_can_be_switched_off(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 10m\n")
        + "exclude:\n  superusers: false\n  listeners: false\n  pooled: false\n"
        + "  member_of: []\n",
    )
    assert cfg.exclude == Exclusions()


def test_policy_exclude_adds_no_provider_roles_of_its_own(tmp_path: Path) -> None:
    # The providers' admin roles are a global default; a policy's exclude only adds.
    cfg = load(tmp_path, with_policy("    state: idle\n    longer_than: 10m\n"
                                     "    exclude: {users: [bob]}\n"))
    assert cfg.policies[0].exclude.member_of == ()
    assert cfg.exclude.member_of == ("rds_superuser", "azure_pg_admin", "cloudsqlsuperuser")


@pytest.mark.parametrize(("text", "fraction"), [("90%", 0.9), ("12.5%", 0.125), ("100%", 1.0)])
def test_when_connections_above(tmp_path: Path, text: str, fraction: float) -> None:
    cfg = load(
        tmp_path,
        with_policy(
            f"    state: idle\n    longer_than: 1m\n    when: {{connections_above: {text}}}\n"
        ),
    )
    assert cfg.policies[0].connections_above == pytest.approx(fraction)


def test_alerts_connections_above(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 1m\n")
        + "alerts:\n  connections_above: 95%\n",
    )
    assert cfg.alerts.connections_above == pytest.approx(0.95)
    assert cfg.alerts.sentry.dsn is None


TWO_TARGETS = """\
targets:
  - name: main
    dsn: postgresql://watchdog@10.0.0.1/postgres
  - name: replica
    dsn: postgresql://watchdog@10.0.0.2/postgres
    interval: 1m
policies:
"""


def test_policy_targets(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        TWO_TARGETS
        + "  - {name: everywhere, state: idle, longer_than: 10m}\n"
        + "  - {name: on-replica, state: active, longer_than: 1h, action: cancel,"
        + " targets: [replica]}\n"
        + "  - {name: on-main, state: idle, longer_than: 1m, targets: main}\n",
    )
    everywhere, on_replica, on_main = cfg.policies
    assert everywhere.targets is None
    assert on_replica.targets == ("replica",)
    assert on_main.targets == ("main",)
    assert [t.name for t in cfg.targets] == ["main", "replica"]
    assert cfg.target("replica").interval == 60.0
    assert cfg.target("main").interval == 30.0


def test_policies_keep_their_order(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        TARGET
        + "policies:\n"
        + "".join(f"  - {{name: p{i}, state: idle, longer_than: {i + 1}m}}\n" for i in range(5)),
    )
    assert [p.name for p in cfg.policies] == [f"p{i}" for i in range(5)]


# -- targets, CIDRs, limits, audit, metrics -------------------------------------------------


def test_target_optional_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "targets:\n"
        "  - name: local\n"
        "  - name: secured\n"
        "    dsn: postgres://watchdog@db1/postgres\n"
        "    password_file: ~/secrets/pg\n"
        "    interval: 500ms\n"
        "policies: [{name: idle, state: idle, longer_than: 10m}]\n",
    )
    local, secured = cfg.targets
    assert local == Target("local", "", None, 30.0)  # libpq environment decides
    assert secured.dsn == "postgres://watchdog@db1/postgres"
    assert secured.password_file == Path.home() / "secrets" / "pg"
    assert secured.interval == 0.5


CIDRS = [
    ("10.0.0.0/8", ipaddress.IPv4Network("10.0.0.0/8")),
    ("192.0.2.7", ipaddress.IPv4Network("192.0.2.7/32")),
    ("192.168.1.0/24", ipaddress.IPv4Network("192.168.1.0/24")),
    ("2001:db8::/32", ipaddress.IPv6Network("2001:db8::/32")),
    ("::1", ipaddress.IPv6Network("::1/128")),
    ("fe80::/10", ipaddress.IPv6Network("fe80::/10")),
]


@pytest.mark.parametrize(("text", "network"), CIDRS, ids=[c[0] for c in CIDRS])
def test_cidrs(tmp_path: Path, text: str, network: ipaddress.IPv4Network) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 10m\n")
        + f"exclude:\n  client_addrs: ['{text}']\n",
    )
    assert cfg.exclude.client_addrs == (network,)


def test_limits_and_audit(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 10m\n")
        + "limits: {max_per_sweep: 1}\naudit: {path: ~/audit.jsonl, query: omit}\n",
    )
    assert cfg.limits.max_per_sweep == 1
    assert cfg.audit.query == "omit"
    assert cfg.audit.path == Path.home() / "audit.jsonl"


@pytest.mark.parametrize("mode", ["redact", "full", "truncate", "omit"])
def test_audit_query_modes_and_redact_by_default(tmp_path: Path, mode: str) -> None:
    policy = with_policy("    state: idle\n    longer_than: 10m\n")
    assert load(tmp_path, policy).audit.query == "redact"
    assert load(tmp_path, policy + f"audit: {{query: {mode}}}\n").audit.query == mode


def test_sentry_send_session_details(tmp_path: Path) -> None:
    policy = with_policy("    state: idle\n    longer_than: 10m\n")
    assert load(tmp_path, policy).alerts.sentry.send_session_details is True
    cfg = load(tmp_path, policy + "alerts: {sentry: {send_session_details: false}}\n")
    assert cfg.alerts.sentry.send_session_details is False
    with pytest.raises(ConfigError, match=r"alerts\.sentry\.send_session_details"):
        load(tmp_path, policy + "alerts: {sentry: {send_session_details: maybe}}\n")


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9187", "127.0.0.1", 9187),
        ("0.0.0.0:9100", "0.0.0.0", 9100),
        ("[::1]:9187", "::1", 9187),
        ("localhost:1", "localhost", 1),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
    ],
)
def test_metrics_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    cfg = load(
        tmp_path,
        with_policy("    state: idle\n    longer_than: 10m\n")
        + f"metrics:\n  listen: '{listen}'\n",
    )
    assert cfg.metrics is not None
    assert (cfg.metrics.host, cfg.metrics.port) == (host, port)


def test_top_level_dry_run(tmp_path: Path) -> None:
    cfg = load(tmp_path, "dry_run: true\n" + with_policy("    state: idle\n    longer_than: 10m\n"))
    assert cfg.dry_run is True
    assert cfg.policies[0].dry_run is False


# -- which file ----------------------------------------------------------------------------


def test_config_path_prefers_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_WATCHDOG_CONFIG", "/from/env.yaml")
    assert config_path("/from/arg.yaml") == "/from/arg.yaml"


def test_config_path_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_WATCHDOG_CONFIG", "/from/env.yaml")
    assert config_path(None) == "/from/env.yaml"


def test_config_path_then_the_system_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_WATCHDOG_CONFIG", raising=False)
    assert config_path(None) == "/etc/pg-watchdog/policies.yaml"
    assert DEFAULT_CONFIG == "/etc/pg-watchdog/policies.yaml"


def test_lock_key_defaults_to_the_shared_constant(tmp_path: Path) -> None:
    cfg = load(tmp_path, with_policy("    state: idle\n    longer_than: 10m\n"))
    assert cfg.lock_key == LEADER_KEY == 1885828964


@pytest.mark.parametrize("key", [0, 42, -1, 2**63 - 1, -(2**63)])
def test_lock_key_takes_any_bigint(tmp_path: Path, key: int) -> None:
    policy = with_policy("    state: idle\n    longer_than: 10m\n")
    cfg = load(tmp_path, policy + f"lock_key: {key}\n")
    assert cfg.lock_key == key
