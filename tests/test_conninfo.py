"""libpq connection strings: the parser against libpq itself (PQconninfoParse through ctypes),
positions of errors, the asyncpg arguments, and real connections through key=value DSNs."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scenario import WATCHDOG_ROLE, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config import conninfo
from watchdog.config.policy import Target
from watchdog.pg.connect import connect


class _Option(ctypes.Structure):
    _fields_ = [("keyword", ctypes.c_char_p), ("envvar", ctypes.c_char_p),
                ("compiled", ctypes.c_char_p), ("val", ctypes.c_char_p),
                ("label", ctypes.c_char_p), ("dispchar", ctypes.c_char_p),
                ("dispsize", ctypes.c_int)]


def _libpq() -> ctypes.CDLL:
    name = ctypes.util.find_library("pq")
    assert name, "libpq (package libpq5) is needed to check the parser against libpq"
    lib = ctypes.CDLL(name)
    lib.PQconninfoParse.restype = ctypes.POINTER(_Option)
    lib.PQconninfoParse.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
    lib.PQconninfoFree.argtypes = [ctypes.POINTER(_Option)]
    return lib


LIBPQ = _libpq()


def libpq_parse(dsn: str) -> dict[str, str] | None:
    """What libpq makes of ``dsn`` (None: libpq rejects it)."""
    err = ctypes.c_char_p()
    opts = LIBPQ.PQconninfoParse(dsn.encode(), ctypes.byref(err))
    if not opts:
        return None
    found = {}
    i = 0
    while opts[i].keyword:
        if opts[i].val is not None:
            found[opts[i].keyword.decode()] = opts[i].val.decode()
        i += 1
    LIBPQ.PQconninfoFree(opts)
    return found


def ours(dsn: str) -> dict[str, str]:
    return {k: p.value for k, p in conninfo.parse(dsn).items()}


# From https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING
DOCUMENTED = [
    "host=localhost port=5432 dbname=mydb connect_timeout=10",
    "host = db1  port=  5432\tdbname =postgres ",
    "password='a b c' user=watchdog",
    r"password='it\'s' user=w",
    r"password='back\\slash'",
    r"password=unquoted\ space user=x",
    "password='' user=x",
    "host= port=5432",  # libpq: host's value is "port=5432"
    "host=a host=b",  # the last one wins
    "sslmode=verify-full sslrootcert=/etc/ssl/ca.pem sslcert=~/c.crt sslkey=/k.key",
    "service=mydb target_session_attrs=read-write",
    "postgresql://",
    "postgresql://localhost",
    "postgresql://localhost:5433",
    "postgresql://localhost/mydb",
    "postgresql://user@localhost",
    "postgresql://user:secret@localhost",
    "postgresql://other@localhost/otherdb?connect_timeout=10&sslmode=require",
    "postgresql://host1:123,host2:456/somedb?target_session_attrs=any",
    "postgresql://h1:5433,h2/db",
    "postgres://u:p%40ss%2Fx@h/d%20b",
    "postgresql://[::1]:5433/db",
    "postgresql://[2001:db8::1234]/database",
    "postgresql:///dbname?host=/var/lib/postgresql",
    "postgresql://%2Fvar%2Flib%2Fpostgresql/dbname",
    "postgresql://localhost/mydb?user=other&password=secret",
]


@pytest.mark.parametrize("dsn", DOCUMENTED)
def test_parses_as_libpq_does(dsn: str) -> None:
    assert ours(dsn) == libpq_parse(dsn)


def test_quoting_values() -> None:
    assert ours(r"password='it\'s a \\ b' user=w") == {"password": "it's a \\ b", "user": "w"}
    assert ours("host = db1   port =5432")["port"] == "5432"
    assert ours("password='' user=x")["password"] == ""
    assert ours("postgresql://u:p%40ss@h/d")["password"] == "p@ss"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["host", "user", "password", "dbname", "sslkey"]),
                          _VALUES, st.sampled_from(["", " ", "  ", "\t"]),
                          st.booleans()), max_size=5))
def test_any_quoted_string_parses_as_libpq_does(
    pairs: list[tuple[str, str, str, bool]]
) -> None:
    parts = []
    for key, value, space, quote_it in pairs:
        written = _quote(value) if quote_it or not value or any(
            c.isspace() or c in "'\\" for c in value) else value
        parts.append(f"{key}{space}={space}{written}")
    dsn = " ".join(parts)
    assert ours(dsn) == libpq_parse(dsn)


@pytest.mark.parametrize(("dsn", "at", "message"), [
    ("host=db1 dbnme=postgres", "dbnme", "dbnme: unknown connection parameter"),
    ("host=db1 database=postgres", "database", "did you mean dbname?"),
    ("host=db1 keepalives=1", "keepalives", "keepalives: not supported"),
    ("host=db1  options='-c x=1'", "options", "options: not supported"),
    ("hostaddr=10.0.0.1", "hostaddr", "hostaddr: not supported"),
    ("host=db1 application_name=x", "application_name", "application_name: not supported"),
    ("host=db1 port=54x2", "port", "port: 54x2 is not a port number"),
    ("host=a,b,c port=1,2", "port", "port: 2 ports for 3 hosts"),
    ("host=db1 sslmode=verify_full", "sslmode", "sslmode: verify_full is not one of"),
    ("connect_timeout=0", "connect_timeout", "connect_timeout: 0 is not a positive"),
    ("host=db1 user", "user", 'expected "=" after a parameter name'),
    ("user=w password='open", "password", "password: unterminated quoted value"),
    ("password=two words=x", "words", "unknown connection parameter after password="),
    ("postgresql://w@db1/postgres?sslmode=require&connect_timeout=5&keepalives=1", "keepalives",
     "keepalives: not supported"),
    ("postgresql://w@db1/postgres?hostaddr=1.2.3.4", "hostaddr", "hostaddr: not supported"),
    ("postgresql://w@db1/postgres?sslmode", "sslmode", 'expected "="'),
    ("postgresql://w:p%zz@db1/postgres", "w:", "password: invalid percent-encoding"),
])
def test_errors_point_at_the_key(dsn: str, at: str, message: str) -> None:
    with pytest.raises(conninfo.ConninfoError) as err:
        conninfo.validate(dsn)
    assert message in err.value.message
    assert err.value.offset == dsn.index(at)


def test_errors_never_show_a_password_word() -> None:
    with pytest.raises(conninfo.ConninfoError) as err:
        conninfo.validate("host=db1 password=Hunter2 Secret")
    assert "Secret" not in str(err.value)
    with pytest.raises(conninfo.ConninfoError) as err:
        conninfo.validate("host=db1 password=Hunter2 Secret=x")
    assert "Secret" not in str(err.value)


@pytest.mark.parametrize("dsn", [
    "postgresql://watchdog:hunter/2@db1/postgres",  # an unencoded '/' in the password
    "postgresql://watchdog:hunter?2@db1/postgres",  # an unencoded '?'
    "postgresql://watchdog:2/hunter@db1/postgres",
    "postgresql://watchdog:5432/hunter@db1/postgres",  # the part before '/' reads as a port
    "postgresql://watchdog:[hunter/2@db1/postgres",
    "postgresql://watchdog:hunter2@db1:54x2/postgres",
])
def test_uri_errors_never_echo_the_user_info_and_suggest_percent_encoding(dsn: str) -> None:
    with pytest.raises(conninfo.ConninfoError) as err:
        conninfo.validate(dsn)
    assert "hunter" not in err.value.message and "watchdog" not in err.value.message
    assert "percent-encode '/', '?' and '@'" in err.value.message
    assert "%2F" in err.value.message


async def test_check_never_echoes_a_password_with_an_unencoded_slash(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("targets:\n  - name: main\n    dsn: postgresql://watchdog:hunter/2@db1/db\n"
                      "policies:\n  - {name: idle, state: idle, longer_than: 10m}\n")
    res = await run_cli("check", "-c", config)
    assert res.rc == 2, res.stderr
    assert "hunter" not in res.stderr + res.stdout
    assert "targets[0].dsn" in res.stderr and "%2F" in res.stderr, res.stderr


def test_connect_args_are_keywords_plus_a_tls_only_uri() -> None:
    args = conninfo.connect_args(
        "host=h1,h2 port=5433 dbname=d user=u password='p w' connect_timeout=7 "
        "sslmode=verify-full sslrootcert='/etc/my ca.pem' target_session_attrs=read-write",
        environ={})
    assert args.kwargs == {"host": ["h1", "h2"], "port": [5433, 5433], "database": "d",
                           "user": "u", "password": "p w",
                           "target_session_attrs": "read-write"}
    assert args.dsn == "postgresql://?sslmode=verify-full&sslrootcert=%2Fetc%2Fmy%20ca.pem"
    assert args.timeout == 7.0
    assert args.tls_files == {"sslrootcert": "/etc/my ca.pem"}
    uri = conninfo.connect_args("postgresql://u@h1:6000,h2/db?sslmode=require",
                                environ={"PGPORT": "6001", "PGSSLROOTCERT": "/ca.pem"})
    assert uri.kwargs == {"host": ["h1", "h2"], "port": [6000, 6001], "database": "db",
                          "user": "u"}
    assert uri.dsn == "postgresql://?sslmode=require"
    assert uri.tls_files == {"sslrootcert": "/ca.pem"}  # from PGSSLROOTCERT
    empty = conninfo.connect_args("", environ={"PGSERVICE": "main"})
    assert (empty.dsn, empty.kwargs, empty.timeout) == ("postgresql://", {"service": "main"}, None)


async def test_connects_through_key_value_dsns(pg: TempCluster) -> None:
    setup_roles(pg)
    # A role whose password is the quoted value below: SCRAM proves it was parsed right.
    pg.psql("DROP ROLE IF EXISTS kv_quoted; CREATE ROLE kv_quoted LOGIN PASSWORD 'x '' y'")
    for dsn, user in (
        (f"host={pg.host} port={pg.port} dbname=postgres user={WATCHDOG_ROLE} sslmode=disable",
         WATCHDOG_ROLE),
        (f"host = '{pg.host}'   port = {pg.port}  user='kv_quoted' password='x \\' y' "
         "dbname = postgres connect_timeout=10", "kv_quoted"),
        (f"postgresql://{WATCHDOG_ROLE}@{pg.host}:{pg.port}/postgres?connect_timeout=10"
         "&target_session_attrs=any", WATCHDOG_ROLE),
        # the unix socket, as libpq tools write it
        (f"host={pg.datadir} port={pg.port} user={WATCHDOG_ROLE} dbname=postgres", WATCHDOG_ROLE),
    ):
        conn = await connect(Target("t", dsn, None, 30.0))
        try:
            assert await conn.fetchval("SELECT current_user") == user
            # Nothing of the DSN reached the server as a setting.
            assert await conn.fetchval("SHOW application_name") == "pg-watchdog"
        finally:
            await conn.close()


async def test_check_reports_an_unknown_key_where_it_is(pg: TempCluster, tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(
        "targets:\n"
        "  - name: main\n"
        f"    dsn: host={pg.host} port={pg.port} user=watchdog keepalives_idle=30\n"
        "policies:\n  - {name: idle, state: idle, longer_than: 1h}\n", encoding="utf-8")
    res = await run_cli("check", "-c", config)
    col = len(f"    dsn: host={pg.host} port={pg.port} user=watchdog ") + 1
    assert res.rc == 2
    assert res.stderr == (f"{config}:3:{col}: targets[0].dsn: keepalives_idle: not supported "
                          "(asyncpg, which pg-watchdog connects with, has no equivalent)\n")
    good = tmp_path / "good.yaml"
    good.write_text(config.read_text().replace(" keepalives_idle=30", " dbname=postgres"),
                    encoding="utf-8")
    setup_roles(pg)
    res = await run_cli("check", "--connect", "-c", good)
    assert res.rc == 0, res.stderr
    assert "reachable at" in res.stdout


async def test_service_file(pg: TempCluster, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    setup_roles(pg)
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[main]\nhost={pg.host}\nport={pg.port}\ndbname=postgres\n"
                        f"user={WATCHDOG_ROLE}\n", encoding="utf-8")
    monkeypatch.delenv("PGSERVICEFILE", raising=False)
    conn = await connect(Target("t", f"service=main servicefile={services}", None, 30.0))
    await conn.close()
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    for dsn, env in (("service=main", {}), ("", {"PGSERVICE": "main"}),
                     ("postgresql://?service=main", {})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        conn = await connect(Target("t", dsn, None, 30.0))
        try:
            assert await conn.fetchval("SELECT current_user") == WATCHDOG_ROLE
        finally:
            await conn.close()


def test_passwords_to_scrub() -> None:
    found = conninfo.passwords(r"host=h password='a b\'c' sslpassword=k3y")
    assert {"a b'c", r"a b\'c", "a%20b%27c", "k3y"} <= set(found)
    assert conninfo.passwords("postgresql://u:p%40ss@h/d")[:1] == ["p@ss"]
