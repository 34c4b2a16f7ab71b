"""Every invalid policy file is rejected with one line naming the exact file, line, column and key.

The corpus lives in tests/invalid_configs/. Each file starts with

    # expect: LINE:COL PATH       (PATH is the key path, or - when there is none)
    # message: TEXT               (a fragment the message must contain; optional)

and is otherwise a small, realistic edit of policies/default.yaml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from watchdog.config.policy import load_config
from watchdog.config.yamlpos import ConfigError

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "invalid_configs"
FILES = sorted(CORPUS.glob("*.yaml"))

# The corpus is checked against this environment only: none of the variables the
# files refer to (PG_WATCHDOG_*, SENTRY_DSN) is set, so ${VAR:-default} takes its default
# and a bare ${VAR} is missing.
CORPUS_ENV: dict[str, str] = {"PGHOST": "db.invalid"}

_EXPECT = re.compile(r"# expect: (\d+):(\d+) (\S+)")
_MESSAGE = re.compile(r"# message: (.*)")


@dataclass(frozen=True)
class Expectation:
    line: int
    col: int
    path: str  # "" when the error has no key path
    message: str


def expectation(file: Path) -> Expectation:
    lines = file.read_text(encoding="utf-8").splitlines()
    head = _EXPECT.fullmatch(lines[0]) if lines else None
    assert head, f"{file.name}: the first line must be '# expect: LINE:COL PATH'"
    more = _MESSAGE.fullmatch(lines[1]) if len(lines) > 1 else None
    path = head.group(3)
    return Expectation(
        int(head.group(1)),
        int(head.group(2)),
        "" if path == "-" else path,
        more.group(1) if more else "",
    )


def config_error(path: str, environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    return info.value


def assert_reported(err: ConfigError, path: str, want: Expectation) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, f"not one line: {text!r}"
    where = f"{path}:{want.line}:{want.col}: "
    assert text.startswith(where), f"expected {where!r}, got {text!r}"
    rest = text[len(where) :]
    if want.path:
        assert rest.startswith(f"{want.path}: "), f"expected key path {want.path!r}: {text!r}"
        assert err.path == want.path
    else:
        assert err.path == "", f"expected no key path: {text!r}"
    message = rest[len(want.path) + 2 :] if want.path else rest
    assert message.strip(), f"empty message: {text!r}"
    assert want.message in message, f"expected {want.message!r} in {text!r}"
    assert (err.file, err.line, err.col) == (path, want.line, want.col)


def test_corpus_is_large_enough() -> None:
    assert len(FILES) >= 30, [f.name for f in FILES]


@pytest.mark.parametrize("file", FILES, ids=[f.name for f in FILES])
def test_invalid_config_is_rejected_at_the_right_place(file: Path) -> None:
    want = expectation(file)
    err = config_error(str(file), CORPUS_ENV)
    assert_reported(err, str(file), want)


@pytest.mark.parametrize("file", FILES, ids=[f.name for f in FILES])
def test_error_uses_the_path_as_given(file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative -c path is reported as typed, not resolved.
    monkeypatch.chdir(CORPUS)
    err = config_error(file.name, CORPUS_ENV)
    assert str(err).startswith(f"{file.name}:")


# -- the real command -------------------------------------------------------------------

CLI_CASES = [
    "yaml_unclosed_bracket.yaml",  # malformed YAML
    "yaml_tab_indentation.yaml",  # malformed YAML
    "env_missing.yaml",  # ${VAR} without default, VAR unset
    "duration_10_minutes.yaml",  # the contract's own example
    "yaml_recursive_alias.yaml",  # used to end in a RecursionError traceback
]


def _cli_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PG_WATCHDOG") and k != "SENTRY_DSN"
    }
    env.update(CORPUS_ENV)
    return env


@pytest.mark.parametrize("name", CLI_CASES, ids=CLI_CASES)
def test_check_command_prints_one_line_and_exits_2(name: str) -> None:
    path = str(CORPUS / name)
    expected = str(config_error(path, CORPUS_ENV))
    proc = subprocess.run(
        [sys.executable, "-m", "watchdog", "check", "-c", path],
        capture_output=True,
        text=True,
        env=_cli_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.splitlines() == [expected], proc.stderr


# -- outside the corpus -----------------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    err = config_error(path, {})
    assert str(err).startswith(f"{path}:1:1: cannot read policy file: ")
    assert "\n" not in str(err)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(str(tmp_path), {})
    assert str(err).startswith(f"{tmp_path}:1:1: cannot read policy file: ")


def test_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes("targets: []\n# caf\xe9\n".encode("latin-1"))
    err = config_error(str(file), {})
    assert str(err).startswith(f"{file}:1:1: cannot read policy file: ")


def test_variable_set_but_empty_without_default(tmp_path: Path) -> None:
    # ${VAR} with VAR="" expands to nothing; for a boolean that is an error at the ${.
    file = tmp_path / "p.yaml"
    file.write_text(
        "dry_run: ${DRY}\n"
        "targets: [{name: main}]\n"
        "policies: [{name: idle, state: idle, longer_than: 10m}]\n"
    )
    err = config_error(str(file), {"DRY": ""})
    assert str(err) == f"{file}:1:10: dry_run: must be true or false, not empty"


def test_first_error_in_a_list_item_names_its_index(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(
        "targets:\n"
        "  - name: a\n"
        "  - name: b\n"
        "    interval: 10\n"
        "policies: [{name: idle, state: idle, longer_than: 10m}]\n"
    )
    err = config_error(str(file), {})
    assert str(err).startswith(f"{file}:4:15: targets[1].interval: 10 has no unit")
