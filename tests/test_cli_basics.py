"""The command line exists and answers: --help for both entry points, check on the seed file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scenario import BIN, REPO, cli_env, policy_file, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

COMMANDS = ("run", "once", "check", "status", "audit", "init", "demo")


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=30, env=cli_env(),
        cwd=REPO, check=False,
    )


def _listed_commands(help_text: str) -> set[str]:
    return {line.split()[0] for line in help_text.splitlines() if line.startswith("    ")}


def test_console_script_help(pg: TempCluster) -> None:
    res = _run(BIN, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: pg-watchdog"), res.stdout
    assert set(COMMANDS) <= _listed_commands(res.stdout), res.stdout
    assert res.stderr == ""


def test_python_m_help(pg: TempCluster) -> None:
    res = _run(sys.executable, "-m", "watchdog", "--help")
    assert res.returncode == 0, res.stderr
    assert "pg-watchdog" in res.stdout.splitlines()[0]
    assert set(COMMANDS) <= _listed_commands(res.stdout), res.stdout
    assert res.stderr == ""
    # Both entry points describe the same commands.
    assert _listed_commands(res.stdout) == _listed_commands(_run(BIN, "--help").stdout)


def test_each_command_has_help(pg: TempCluster) -> None:
    for command in COMMANDS:
        res = _run(BIN, command, "--help")
        assert res.returncode == 0, (command, res.stderr)
        assert f"pg-watchdog {command}" in res.stdout, (command, res.stdout)


def test_check_default_policies(pg: TempCluster) -> None:
    res = _run(BIN, "check", "-c", "policies/default.yaml")
    assert res.returncode == 0, res.stderr
    assert "policies/default.yaml: ok" in res.stdout, res.stdout
    assert res.stderr == ""


def test_check_scenario_policies(pg: TempCluster, tmp_path: Path) -> None:
    """The policy files the scenario tests write are valid for this server's target."""
    setup_roles(pg)
    path = policy_file(tmp_path, pg, max_per_sweep=3, self_trap=True, policy_dry_run=True)
    res = _run(BIN, "check", "-c", path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{path}: ok (1 targets, 3 policies)", res.stdout


def test_check_bad_file_exits_2(pg: TempCluster, tmp_path: Path) -> None:
    path = policy_file(tmp_path, pg, idle="10 minutes")
    res = _run(BIN, "check", "-c", path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "longer_than" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
