"""The systemd files in systemd/: checked with systemd's own tools, not by eye.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` run on
the real unit file, unchanged. verify checks that ExecStart=/ExecReload= name
executables, so it runs with ``--root`` on a throwaway tree holding the unit,
the host's system units (sysinit.target and friends) and stub executables at the
unit's own paths (/opt/pg-watchdog/bin/pg-watchdog, /bin/kill).

systemd-analyze is a requirement of this suite (Debian package ``systemd``):
without it these tests fail rather than skip.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "pg-watchdog.service"
SYSUSERS = SYSTEMD_DIR / "pg-watchdog.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "pg-watchdog.tmpfiles.conf"
LOGROTATE = SYSTEMD_DIR / "pg-watchdog.logrotate"
MAX_EXPOSURE = 2.0
HOST_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package 'systemd'); it is required")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned (unit files repeat keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def _exec_paths(service: dict[str, list[str]]) -> list[str]:
    paths = []
    for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop"):
        for value in service.get(key, []):
            # Strip the special prefixes (-, @, :, +, !) systemd allows before the path.
            paths.append(value.split()[0].lstrip("-@:+!"))
    return paths


def _make_root(root: Path, unit_text: str, exec_paths: list[str]) -> None:
    """A --root tree: the host's system units, the unit to check, stub executables."""
    host = next((Path(d) for d in HOST_UNIT_DIRS if (Path(d) / "sysinit.target").exists()), None)
    if host is None:
        pytest.fail(f"no systemd system units (sysinit.target) in {HOST_UNIT_DIRS}")
    shutil.copytree(host, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    for exe in exec_paths:
        stub = root / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        _tool("systemd-analyze"),
        "verify",
        "--man=no",
        "--generators=no",
        "--recursive-errors=no",
        f"--root={root}",
        UNIT.name,
    )


@pytest.fixture(scope="module")
def verify_root(
    tmp_path_factory: pytest.TempPathFactory, service: dict[str, list[str]]
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("verify-root")
    _make_root(root, UNIT.read_text(), _exec_paths(service))
    yield root
    shutil.rmtree(root, ignore_errors=True)


# -- systemd-analyze verify ---------------------------------------------------------


def test_unit_verifies_clean(verify_root: Path) -> None:
    result = _verify(verify_root)
    output = (result.stdout + result.stderr).strip()
    complaints = [line for line in output.splitlines() if "pg-watchdog" in line]
    assert result.returncode == 0, output
    assert complaints == [], output


def test_verify_would_catch_a_bad_unit(tmp_path: Path, service: dict[str, list[str]]) -> None:
    """The check above is real: a typo'd key and a missing executable are reported."""
    broken = UNIT.read_text().replace("LockPersonality=", "LockPersonalty=")
    _make_root(tmp_path, broken, [p for p in _exec_paths(service) if p != "/bin/kill"])
    result = _verify(tmp_path)
    output = result.stdout + result.stderr
    assert "Unknown key 'LockPersonalty'" in output
    assert "/bin/kill" in output
    assert result.returncode != 0


# -- systemd-analyze security -----------------------------------------------------------


def test_security_exposure(tmp_path: Path) -> None:
    result = _run(_tool("systemd-analyze"), "security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for pg-watchdog\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output
    # Nothing the unit sets may be flagged as open.
    for setting in (
        "User=/DynamicUser=",
        "NoNewPrivileges=",
        "PrivateUsers=",
        "ProtectSystem=",
        "ProtectProc=",
        "ProcSubset=",
        "MemoryDenyWriteExecute=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "NotifyAccess=",
    ):
        line = next((ln for ln in output.splitlines() if f" {setting} " in ln), "")
        assert line.lstrip().startswith("✓"), f"{setting}: {line!r}\n{output}"


# -- the unit says what the product needs ------------------------------------------------


def test_unit_service_contract(service: dict[str, list[str]]) -> None:
    def one(key: str) -> str:
        values = service.get(key)
        assert values, f"{key}= is not set"
        return values[-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == (
        "/opt/pg-watchdog/bin/pg-watchdog run -c /etc/pg-watchdog/policies.yaml"
    )
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("WatchdogSec") == "60s"
    assert one("Restart") == "on-failure"
    assert one("TimeoutStopSec") == "60s"
    assert one("User") == one("Group") == "pg-watchdog"
    assert "DynamicUser" not in service, "the audit log needs a stable owner"
    assert one("LogsDirectory") == "pg-watchdog"
    assert one("LogsDirectoryMode") == "0750"
    assert one("UMask") == "0027"  # audit.jsonl comes out 0640
    assert "-/etc/pg-watchdog/env" in service["EnvironmentFile"]
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    families = one("RestrictAddressFamilies").split()
    assert "AF_UNIX" in families, "the notify socket and local PostgreSQL sockets are AF_UNIX"
    assert {"AF_INET", "AF_INET6"} <= set(families), "targets and Sentry are over the network"
    assert "IPAddressDeny" not in service, "remote targets and Sentry must stay reachable"
    assert one("CapabilityBoundingSet") == ""
    assert one("MemoryDenyWriteExecute") == "yes"
    # Ceilings a runaway hits before the host does (measured: docs in the unit's comment).
    assert one("MemoryMax") == "512M"
    assert one("TasksMax") == "128"


# -- sysusers.d / tmpfiles.d / logrotate ----------------------------------------------------


def _passwd(root: Path, name: str) -> list[str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} not in {root}/etc/passwd")


def test_sysusers_creates_a_system_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = _run(_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    _name, _pw, uid, gid, _gecos, home, shell = _passwd(tmp_path, "pg-watchdog")
    assert int(uid) < 1000 and int(gid) < 1000, "a system user"
    assert home == "/"
    assert shell.endswith("nologin")
    assert any(
        line.split(":")[0] == "pg-watchdog"
        for line in (tmp_path / "etc/group").read_text().splitlines()
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles chowns: needs root")
def test_tmpfiles_sets_owners_and_modes(tmp_path: Path) -> None:
    (tmp_path / "etc/pg-watchdog").mkdir(parents=True)
    (tmp_path / "etc/pg-watchdog/env").write_text("SENTRY_DSN=\n")
    (tmp_path / "etc/pg-watchdog/env").chmod(0o644)
    assert _run(_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)).returncode == 0
    _name, _pw, uid, gid, *_ = _passwd(tmp_path, "pg-watchdog")
    result = _run(_tool("systemd-tmpfiles"), "--create", f"--root={tmp_path}", str(TMPFILES))
    assert result.returncode == 0, result.stderr

    logs = (tmp_path / "var/log/pg-watchdog").stat()
    assert (logs.st_uid, logs.st_gid) == (int(uid), int(gid))
    assert stat.S_IMODE(logs.st_mode) == 0o750
    env = (tmp_path / "etc/pg-watchdog/env").stat()
    assert (env.st_uid, env.st_gid) == (0, int(gid))
    assert stat.S_IMODE(env.st_mode) == 0o640
    assert not (tmp_path / "etc/pg-watchdog/policies.yaml").exists(), "z never creates"


def test_logrotate_needs_no_reload_and_names_only_the_log() -> None:
    """Every write opens the log anew: no reload (it would apply a half-edited policy file),
    no copytruncate; the exact path, no glob that could reach the intent journals."""
    text = LOGROTATE.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^/var/log/pg-watchdog/audit\.jsonl \{$", body, re.M)
    assert "*" not in body and "?" not in body
    assert re.search(r"^\s*compress\s*$", body, re.M)
    assert re.search(r"^\s*delaycompress\s*$", body, re.M)
    assert not re.search(r"^\s*copytruncate\s*$", body, re.M)
    assert "postrotate" not in body and "reload" not in body
    assert re.search(r"^\s*create 0640 pg-watchdog pg-watchdog\s*$", body, re.M)
