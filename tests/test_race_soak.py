"""A short race soak (bench/race_soak.py) per major: no kill without its threshold, no kill
without its record, judged from the server's own statement log.

40 clients flip between idling around the 1 s threshold, short statements and transactions
left idle (sometimes aborted) around it; the real TargetRunner sweeps every 50 ms. The full
size run is ``bench/race_soak.py`` (thousands of sweeps, or ``--mode daemon``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import MAJORS

from watchdog.commands.demo.tempcluster import TempCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import race_soak


def _cluster(make_cluster, major: int, clients: int) -> TempCluster:
    c: TempCluster = make_cluster(
        major, max_connections=clients + 20, settings=race_soak.LOG_SETTINGS
    )
    race_soak.setup_cluster_roles(c)
    return c


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_race_soak(make_cluster, tmp_path: Path, major: int) -> None:
    c = _cluster(make_cluster, major, 40)
    r = await race_soak.soak(c, tmp_path, clients=40, sweeps=400, duration=22, interval=0.05)
    print(r.report())
    assert r.problems() == [], (r.problems(), r.details)
    assert r.wrongful == 0
    assert r.sweeps >= 200 and r.sweeps_in_server_log == r.sweeps
    # Every kill has its record and every 'terminated' record its kill.
    assert r.outcomes.get("terminated", 0) >= 50
    assert r.unrecorded_kills == r.deaths_without_record == r.phantom_terminations == 0
    assert r.statements_logged > 500


async def test_widened_race_window_is_skipped_not_killed(make_cluster, tmp_path: Path) -> None:
    """Up to 300 ms between look and act: many sessions change meanwhile; none is killed."""
    c = _cluster(make_cluster, MAJORS[-1], 30)
    r = await race_soak.soak(c, tmp_path, clients=30, sweeps=10_000, duration=10,
                             interval=0.05, act_delay=0.3, seed=1)
    print(r.report())
    assert r.problems() == [], (r.problems(), r.details)
    assert r.outcomes.get("skipped_changed", 0) >= 3
    assert r.skipped_without_visible_change == 0


async def test_checker_catches_an_unsafe_act(make_cluster, tmp_path: Path) -> None:
    """The judge has teeth: without the ACT's race check, the same soak finds wrongful kills."""
    c = _cluster(make_cluster, MAJORS[-1], 30)
    r = await race_soak.soak(c, tmp_path, clients=30, sweeps=10_000, duration=10,
                             interval=0.05, act_delay=0.3, unsafe_act=True, seed=1)
    print(r.report())
    assert r.wrongful >= 1
    assert r.unrecorded_kills == r.phantom_terminations == 0
