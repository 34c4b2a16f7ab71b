"""The layers of watchdog/ are contracts lint-imports checks (pyproject.toml, [tool.importlinter]):
the real tree keeps them, and a copy with one import pointing up fails, naming the contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache", "--no-logo"], cwd=tree, capture_output=True,
                          text=True, timeout=120, check=False)


def copy_of_tree(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "watchdog", tmp_path / "watchdog",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(module: Path, line: str) -> None:
    text = module.read_text()
    module.write_text(text.replace("\nfrom ", f"\n{line}\nfrom ", 1))


def test_the_tree_keeps_every_contract() -> None:
    run = lint(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout
    assert "KEPT" in run.stdout


@pytest.mark.parametrize(("module", "line", "contract", "arrow"), [
    ("core/decide.py", "import watchdog.service.sweep  # noqa", "Layers of watchdog",
     "watchdog.core.decide -> watchdog.service.sweep"),
    ("service/sweep.py", "import watchdog.commands.once  # noqa", "Layers of watchdog",
     "watchdog.service.sweep -> watchdog.commands.once"),
    ("pg/act.py", "import watchdog.alerts.hub  # noqa", "Layers of watchdog",
     "watchdog.pg.act -> watchdog.alerts.hub"),
    ("alerts/metrics.py", "import typing  # noqa\nif typing.TYPE_CHECKING:\n"
     "    import watchdog.service.sweep  # noqa", "Layers of watchdog",
     "watchdog.alerts.metrics -> watchdog.service.sweep"),  # types count too
    ("core/rules.py", "import asyncio  # noqa", "core is pure", "watchdog.core.rules -> asyncio"),
    ("pg/connect.py", "import temppooler  # noqa", "watchdog never imports the tests",
     "watchdog.pg.connect -> temppooler"),
    ("core/blockers.py", "from watchdog.core import decide  # noqa", "No import cycles",
     ".blockers -> .decide"),
])
def test_an_import_against_the_layers_fails_naming_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, arrow: str
) -> None:
    tree = copy_of_tree(tmp_path)
    assert lint(tree).returncode == 0  # the copy keeps them before the change
    add_line(tree / "watchdog" / module, line)
    run = lint(tree)
    assert run.returncode != 0
    broken = [ln for ln in run.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), run.stdout
    assert arrow in run.stdout, run.stdout
