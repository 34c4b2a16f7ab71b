"""TLS as on managed services: a server with ssl=on and a certificate signed by a CA the test
makes (openssl CLI); every sslmode, client certificates, the PGSSL* variables, and one clear
line (target + TLS reason, exit 1) for a certificate that does not verify or a missing file."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAJORS, _start
from scenario import BIN, WATCHDOG_ROLE, CliResult, cli_env, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster, run_as_user
from watchdog.config.policy import Target
from watchdog.pg.connect import TargetError, connect

SERVER_NAME = "localhost"  # the server certificate's only name: 127.0.0.1 does not match it
# The server sends its CA along (ssl_ca_file is set), so OpenSSL finds a foreign root in the
# chain; without it the reason reads "unable to get local issuer certificate".
WRONG_CA = "TLS: certificate verify failed: self-signed certificate in certificate chain"


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         check=False, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)}: {res.stderr}"


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN=pg-watchdog test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\nbasicConstraints=CA:FALSE\n", encoding="utf-8")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    """ca.crt, server.crt/key (DNS:localhost), client.crt/key (CN=watchdog), other-ca.crt."""
    d = Path(tempfile.mkdtemp(prefix="pg-watchdog-tls-"))
    try:
        _ca(d, "ca")
        _ca(d, "other-ca")
        _leaf(d, "server", SERVER_NAME,
              f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth")
        _leaf(d, "client", WATCHDOG_ROLE, "extendedKeyUsage=clientAuth")
        # The server runs as another OS user: it must read the directory and its own key,
        # which PostgreSQL wants private to it.
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o644)
        (d / "server.key").chmod(0o600)
        if user := run_as_user():
            shutil.chown(d / "server.key", user)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def server(request: pytest.FixtureRequest, certs: Path) -> Iterator[TempCluster]:
    """A cluster with ssl=on; it asks for (does not require) client certificates. The matrix's
    16 and 18 wheels lack OpenSSL: every major runs here from a build that has it."""
    cluster = _start(request.param, with_openssl=True, settings={
        "ssl": "on",
        "ssl_cert_file": f"'{certs / 'server.crt'}'",
        "ssl_key_file": f"'{certs / 'server.key'}'",
        "ssl_ca_file": f"'{certs / 'ca.crt'}'",
    })
    try:
        setup_roles(cluster)
        yield cluster
    finally:
        cluster.cleanup()


def _dsn(server: TempCluster, host: str = SERVER_NAME, **params: str) -> str:
    extra = "".join(f" {k}='{v}'" for k, v in params.items())
    return f"host={host} port={server.port} dbname=postgres user={WATCHDOG_ROLE}{extra}"


async def _ssl_in_use(dsn: str) -> tuple[bool, str | None]:
    conn = await connect(Target("main", dsn, None, 30.0))
    try:
        row = await conn.fetchrow(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return bool(row["ssl"]), row["client_dn"]
    finally:
        await conn.close()


def test_the_server_is_the_major_under_test_with_ssl_on(server: TempCluster) -> None:
    assert int(server.psql("SHOW server_version_num")) // 10000 == server.major
    assert server.psql("SHOW ssl") == "on"


async def test_every_sslmode(server: TempCluster, certs: Path) -> None:
    ca = str(certs / "ca.crt")
    expected = {"disable": False, "allow": False, "prefer": True, "require": True}
    for mode, ssl in expected.items():
        assert (await _ssl_in_use(_dsn(server, sslmode=mode)))[0] is ssl, mode
    assert (await _ssl_in_use(_dsn(server, sslmode="verify-ca", sslrootcert=ca)))[0]
    # verify-ca checks the chain, not the name: 127.0.0.1 is fine there.
    assert (await _ssl_in_use(_dsn(server, "127.0.0.1", sslmode="verify-ca", sslrootcert=ca)))[0]
    assert (await _ssl_in_use(_dsn(server, sslmode="verify-full", sslrootcert=ca)))[0]


async def test_client_certificate_is_presented(server: TempCluster, certs: Path) -> None:
    ssl, client_dn = await _ssl_in_use(_dsn(
        server, sslmode="verify-full", sslrootcert=str(certs / "ca.crt"),
        sslcert=str(certs / "client.crt"), sslkey=str(certs / "client.key")))
    assert ssl
    assert client_dn is not None and f"CN={WATCHDOG_ROLE}" in client_dn


async def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> CliResult:
    proc = await asyncio.create_subprocess_exec(
        str(BIN), *args, "-c", str(config), env=cli_env() | (env or {}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    result = CliResult(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _config(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(
        "targets:\n"
        f"  - name: main\n    dsn: \"{dsn}\"\n"
        "policies:\n  - {name: idle, state: idle, longer_than: 1h}\n"
        f"audit:\n  path: {tmp_path / 'audit.jsonl'}\n", encoding="utf-8")
    return path


async def test_verify_full_and_require_from_the_cli(
    server: TempCluster, certs: Path, tmp_path: Path
) -> None:
    ca = str(certs / "ca.crt")
    for dsn in (_dsn(server, sslmode="verify-full", sslrootcert=ca),
                f"postgresql://{WATCHDOG_ROLE}@{SERVER_NAME}:{server.port}/postgres"
                f"?sslmode=verify-full&sslrootcert={ca}",
                _dsn(server, "127.0.0.1", sslmode="require")):
        res = await _cli(_config(tmp_path, dsn), "check", "--connect")
        assert res.rc == 0, (dsn, res.stdout, res.stderr)
        assert "reachable at" in res.stdout
        res = await _cli(_config(tmp_path, dsn), "once")
        assert res.rc == 0, (dsn, res.stdout, res.stderr)


async def test_pgssl_environment_variables(
    server: TempCluster, certs: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, _dsn(server))
    env = {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(certs / "ca.crt")}
    res = await _cli(config, "check", "--connect", env=env)
    assert res.rc == 0, (res.stdout, res.stderr)
    env["PGSSLROOTCERT"] = str(certs / "other-ca.crt")
    res = await _cli(config, "once", env=env)
    assert (res.rc, res.stderr) == (1, f"pg-watchdog: main: {WRONG_CA}\n")


@pytest.mark.parametrize(("host", "params", "reason"), [
    (SERVER_NAME, {"sslmode": "verify-full", "sslrootcert": "other-ca.crt"},
     WRONG_CA),
    (SERVER_NAME, {"sslmode": "verify-ca", "sslrootcert": "other-ca.crt"},
     WRONG_CA),
    ("127.0.0.1", {"sslmode": "verify-full", "sslrootcert": "ca.crt"},
     "TLS: certificate verify failed: IP address mismatch, certificate is not valid for "
     "'127.0.0.1'"),
    (SERVER_NAME, {"sslmode": "verify-full", "sslrootcert": "missing/ca.crt"},
     "TLS: cannot read sslrootcert {certs}/missing/ca.crt: No such file or directory"),
    (SERVER_NAME, {"sslmode": "require", "sslcert": "missing.crt", "sslkey": "client.key"},
     "TLS: cannot read sslcert {certs}/missing.crt: No such file or directory"),
    (SERVER_NAME, {"sslmode": "prefer", "sslcert": "client.crt", "sslkey": "missing.key"},
     "TLS: cannot read sslkey {certs}/missing.key: No such file or directory"),
])
async def test_tls_failure_is_one_line(
    server: TempCluster, certs: Path, tmp_path: Path, host: str, params: dict[str, str],
    reason: str,
) -> None:
    files = {k: v if k == "sslmode" else str(certs / v) for k, v in params.items()}
    config = _config(tmp_path, _dsn(server, host, **files))
    line = "main: " + reason.format(certs=certs)
    res = await _cli(config, "once")
    assert (res.rc, res.stderr) == (1, f"pg-watchdog: {line}\n")
    res = await _cli(config, "check", "--connect")
    assert res.rc == 1
    assert f"FAIL  cannot connect: {reason.format(certs=certs)}\n" in res.stdout
    with pytest.raises(TargetError) as err:
        await connect(Target("main", _dsn(server, host, **files), None, 30.0))
    assert str(err.value) == line


async def test_system_ca_store(server: TempCluster, certs: Path, tmp_path: Path) -> None:
    # sslrootcert=system (libpq 16+) trusts the operating system's CAs; OpenSSL's
    # SSL_CERT_FILE stands in for them here.
    dsn = _dsn(server, sslrootcert="system")
    res = await _cli(_config(tmp_path, dsn), "check", "--connect",
                     env={"SSL_CERT_FILE": str(certs / "ca.crt")})
    assert res.rc == 0, (res.stdout, res.stderr)
    res = await _cli(_config(tmp_path, _dsn(server, "127.0.0.1", sslrootcert="system")), "once",
                     env={"SSL_CERT_FILE": str(certs / "ca.crt")})
    assert (res.rc, res.stderr) == (1, "pg-watchdog: main: TLS: certificate verify failed: IP "
                                       "address mismatch, certificate is not valid for "
                                       "'127.0.0.1'\n")
    res = await _cli(_config(tmp_path, dsn), "once",
                     env={"SSL_CERT_FILE": str(certs / "other-ca.crt")})
    assert res.rc == 1
    assert res.stderr.startswith("pg-watchdog: main: TLS: certificate verify failed: ")
    res = await _cli(_config(tmp_path, dsn + " sslmode=require"), "check")
    assert res.rc == 2
    assert "sslrootcert=system needs sslmode=verify-full, not require" in res.stderr


def test_no_user_certificates_in_home() -> None:
    # asyncpg falls back to ~/.postgresql/root.crt and postgresql.crt: the tests above assume
    # there are none (else `require` would verify against them).
    assert not (Path(os.path.expanduser("~")) / ".postgresql").exists()
