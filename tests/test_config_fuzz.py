"""Fuzzing the policy file: whatever the file holds, load_config returns a Config or raises
a ConfigError that is one printable line starting with ``FILE:LINE:COL: ``, never another
exception (a user would see a traceback).

In-process, per run: 500 random YAML documents (Hypothesis recursive strategies of
mappings, lists and scalars, yaml.safe_dump'ed), 500 config-shaped documents, 1,000
mutations of policies/default.yaml and 500 raw texts = 2,500 cases, plus the regression
inputs below; then 20 random cases through the real `python -m watchdog check -c FILE`.
The generators and the judge are bench/fuzz_config.py's, which runs 50,000 cases.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent


def _load_fuzzer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_config", REPO / "bench" / "fuzz_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()


def cases(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])



@pytest.fixture(scope="module")
def case_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "policies.yaml"


def assert_clean(path: Path, data: bytes) -> str:
    result = fuzz.judge(path, data)
    assert result.verdict != "crash", f"{result.detail}\n--- input ---\n{data!r}"
    return str(result.verdict)


# -- strategies ----------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(fuzz.TOKENS),
)
keys = st.one_of(st.sampled_from(fuzz.ALL_KEYS), st.sampled_from(fuzz.ALL_KEYS),
                 st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)
documents = st.one_of(values, st.dictionaries(st.sampled_from(fuzz.TOP_KEYS), values,
                                              min_size=1, max_size=8))
dump_styles = st.fixed_dictionaries({
    "default_flow_style": st.sampled_from([False, None, True]),
    "allow_unicode": st.booleans(),
    "width": st.sampled_from([80, 20, 10**6]),
})
raw_texts = st.lists(
    st.one_of(st.sampled_from(list(fuzz.PUNCT) + list(fuzz.ODD)),
              st.sampled_from(fuzz.ALL_KEYS + fuzz.FRAGMENTS), st.characters()),
    max_size=60,
).map("".join)
# The generators shared with the bench take a random.Random; Hypothesis picks its seed
# (a failure prints the seed, which replays it exactly).
seeds = st.integers(0, 2**64)


# -- in-process ------------------------------------------------------------------


@cases(500)
@given(documents, dump_styles)
def test_random_yaml_documents_load_or_fail_cleanly(case_file: Path, doc: Any,
                                                     style: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, **style)
    assert_clean(case_file, text.encode("utf-8"))


@cases(500)
@given(seeds)
def test_config_shaped_documents_load_or_fail_cleanly(case_file: Path, seed: int) -> None:
    rng = random.Random(seed)
    assert_clean(case_file, fuzz.dump(rng, fuzz.config_like(rng)).encode("utf-8"))


@cases(1000)
@given(seeds)
def test_mutations_of_the_default_policies_load_or_fail_cleanly(case_file: Path,
                                                                 seed: int) -> None:
    assert_clean(case_file, fuzz.mutate(random.Random(seed)))


@cases(500)
@given(raw_texts)
def test_raw_text_loads_or_fails_cleanly(case_file: Path, text: str) -> None:
    assert_clean(case_file, text.encode("utf-8", "surrogatepass"))


def test_the_generators_reach_both_outcomes(case_file: Path) -> None:
    """The fuzzer is only as good as its inputs: a share must pass, most must be rejected."""
    rng = random.Random(7)
    verdicts = [assert_clean(case_file, fuzz.generate(rng)[1]) for _ in range(300)]
    assert verdicts.count("accepted") >= 20
    assert verdicts.count("rejected") >= 150


# Inputs that crashed the loader before (each was a traceback or a garbled message).
REGRESSIONS = {
    "deep_flow_nesting": "[" * 1000,
    "deep_mapping_nesting": "{a: " * 1000,
    "deep_block_nesting": "\n".join("  " * d + "- " for d in range(400)) + "x",
    "unicode_digit_port": "metrics: {listen: '127.0.0.1:\u00b2'}\n",
    "infinite_interval": "targets: [{name: m, interval: " + "9" * 400 + "d}]\n",
    "interval_beyond_datetime": "targets: [{name: m, interval: 99999999999999d}]\n",
    "longer_than_infinite": "targets: [{name: m}]\npolicies: [{name: p, state: idle, "
                            "longer_than: " + "9" * 400 + "d}]\n",
    "newline_in_a_key": 'targets: [{name: m}]\npolicies: [{name: p, state: idle, '
                        'longer_than: 1m, "us\\ners": [a]}]\n',
    "escape_sequence_in_a_key": '"\\e[31mtargets": []\n',
    "nbsp_in_a_key": "p\u00a0olicies: []\n",
    "nul_in_audit_path": 'targets: [{name: m}]\npolicies: [{name: p, state: idle, '
                         'longer_than: 1m}]\naudit: {path: "/tmp/a\\0b"}\n',
    "nul_in_password_file": 'targets: [{name: m, password_file: "/run/\\0pw"}]\n',
    "int_tag_on_empty_string": 'targets: !!int ""\n',
    "int_tag_without_value": "dry_run: !!int\n",
    "float_tag_on_empty_string": 'dry_run: !!float ""\n',
    "bool_tag_on_empty_string": 'dry_run: !!bool ""\n',
}


@pytest.mark.parametrize("text", REGRESSIONS.values(), ids=REGRESSIONS.keys())
def test_regression_inputs_are_rejected_cleanly(case_file: Path, text: str) -> None:
    assert assert_clean(case_file, text.encode("utf-8")) == "rejected"


def test_nesting_too_deep_points_at_the_first_level_too_deep(case_file: Path) -> None:
    result = fuzz.judge(case_file, b"x: " + b"[" * 1000)
    assert result.detail == f"{case_file}:1:103: invalid YAML: nested more than 100 levels deep"


def test_a_key_with_a_newline_is_shown_escaped(case_file: Path) -> None:
    result = fuzz.judge(case_file, REGRESSIONS["newline_in_a_key"].encode())
    assert "policies[0]['us\\ners']: unknown key" in result.detail


# -- the real command ----------------------------------------------------------------

CLI_CASES = 20


def _cli_cases() -> list[tuple[str, bytes]]:
    rng = random.Random(20261125)
    cases = [fuzz.generate(rng) for _ in range(CLI_CASES - 4)]
    # Make sure both exits and the worst inputs are among them.
    cases += [("default", fuzz.BASE.encode()), ("deep", b"[" * 1000),
              ("port", REGRESSIONS["unicode_digit_port"].encode()),
              ("nul", REGRESSIONS["nul_in_audit_path"].encode())]
    return cases


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_WATCHDOG", "SENTRY"))}
    return subprocess.run([sys.executable, "-m", "watchdog", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def test_check_command_on_random_files_exits_0_or_2_without_traceback(tmp_path: Path) -> None:
    files = []
    for i, (kind, data) in enumerate(_cli_cases()):
        path = tmp_path / f"case{i:02d}-{kind}.yaml"
        path.write_bytes(data)
        files.append(path)
    run: Callable[[Path], subprocess.CompletedProcess[str]] = _check
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(run, files))
    codes = []
    for path, res in zip(files, results, strict=True):
        where = f"{path.name}: exit {res.returncode}\n{res.stderr}"
        assert res.returncode in (0, 2), where
        assert "Traceback" not in res.stderr + res.stdout, where
        if res.returncode == 2:
            (line,) = res.stderr.splitlines()
            assert line.startswith(f"{path}:"), where
        else:
            assert res.stdout.startswith(f"{path}: ok"), where
        codes.append(res.returncode)
    assert {0, 2} <= set(codes)


@pytest.mark.parametrize(("value", "verdict"), [("3650d", "accepted"), ("3650d1ms", "rejected"),
                                                ("87600h", "accepted"), ("87601h", "rejected")])
def test_durations_are_bounded_at_ten_years(case_file: Path, value: str, verdict: str) -> None:
    text = (f"targets: [{{name: m, interval: {value}}}]\n"
            f"policies: [{{name: p, state: idle, longer_than: {value}}}]\n")
    assert assert_clean(case_file, text.encode()) == verdict
