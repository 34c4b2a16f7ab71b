"""A small file cannot exhaust the host: alias expansion and the file size are capped, with one
line at the spot and exit 2 (the bomb itself is in invalid_configs/, where its exact line and
column are checked; its reload is in test_reload_checks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from watchdog.config.policy import load_config
from watchdog.config.yamlpos import MAX_BYTES, MAX_NODES, ConfigError

CORPUS = Path(__file__).resolve().parent / "invalid_configs"
VALID = """targets: [{name: main, dsn: "postgresql://watchdog@127.0.0.1:5432/postgres"}]
policies: [{name: idle, state: idle, longer_than: 10m}]
"""


# `pg-watchdog check`, then its own peak memory (VmHWM: this process's, unlike ru_maxrss,
# which keeps the forking parent's across exec) written to the file named by argv[2].
_CHECK = """
import sys
from pathlib import Path
from watchdog.commands.cli import main
code = main(["check", "-c", sys.argv[1]])
peak = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
Path(sys.argv[2]).write_text(peak.split()[1])
sys.exit(code)
"""


def check(path: Path, tmp_path: Path) -> tuple[int, str, float]:
    """`pg-watchdog check -c PATH`: exit code, stderr, and that process's peak memory (MB)."""
    peak = tmp_path / "peak"
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, str(path), str(peak)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    return proc.returncode, proc.stderr, int(peak.read_text()) / 1024


def test_alias_bomb_is_one_line_exit_2_in_bounded_memory(tmp_path: Path) -> None:
    bomb = CORPUS / "yaml_alias_bomb.yaml"
    assert os.path.getsize(bomb) < 1024
    code, stderr, peak = check(bomb, tmp_path)
    assert code == 2, stderr
    assert stderr == (
        f"{bomb}:19:23: exclude.applications[4][3]: invalid YAML: at this alias, aliases expand"
        f" to more than {MAX_NODES} nodes (a policy file has a few hundred)\n"
    )
    assert peak < 150, f"{peak:.0f} MB"  # a million nodes took 420-820 MB and 12-16 s


def test_many_plain_nodes_stop_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(VALID + "x: [" + ", ".join(["a"] * (MAX_NODES + 10)) + "]\n")
    try:
        load_config(str(path), environ={})
    except ConfigError as exc:
        assert exc.line == 3 and exc.path == ""
        assert f"more than {MAX_NODES} nodes" in exc.message
    else:
        raise AssertionError("accepted")


def test_file_too_large_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    comment = "# " + "x" * 77 + "\n"
    path.write_text(VALID + comment * (MAX_BYTES // len(comment) + 1))  # valid YAML, all comment
    code, stderr, _ = check(path, tmp_path)
    assert code == 2, stderr
    assert stderr == (
        f"{path}:1:1: the policy file is larger than {MAX_BYTES // 1024} KiB"
        " (a policy file is a few KiB)\n"
    )


def test_an_endless_file_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "watchdog", "check", "-c", "/dev/zero"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("/dev/zero:1:1: the policy file is larger than")
