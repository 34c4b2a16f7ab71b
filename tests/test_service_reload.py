"""Reloading the real `pg-watchdog run` onto a new audit.path while records are held back:
they still reach the old file (whose journal holds their intents), exactly once."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

from conftest import MAJORS
from daemon import Daemon, write_config
from faults import by_pid, close_all, open_victims, pids_of, read_records, size
from helpers import wait_for
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


async def _recorded(audit: Path, pids: list[int], timeout: float = 30) -> None:
    await wait_for(
        lambda: set(pids) <= set(by_pid(read_records(audit))),
        timeout=timeout,
        interval=0.1,
        what=f"records for {pids} in {audit.name}",
    )


async def test_held_back_records_follow_their_own_log_across_a_path_change(
    make_cluster, tmp_path: Path
) -> None:
    c: TempCluster = make_cluster(MAJORS[-1])
    setup_roles(c)
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_bytes(b"\n" * 65536)  # bigger than any journal, so only its appends hit the limit
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms", audit=old)
    with Daemon(cfg) as d:
        v0 = await open_victims(c, 1)
        await _recorded(old, pids_of(v0))
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (size(old), resource.RLIM_INFINITY))
        try:
            held = await open_victims(c, 2)
            await wait_for(lambda: "File too large" in d.log(), timeout=30, what="EFBIG")
            write_config(cfg, c, idle="1s", interval="250ms", audit=new)
            d.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "reloaded" in d.log(), timeout=30, what="the reload")
            after = await open_victims(c, 1)
            await _recorded(new, pids_of(after))
        finally:
            resource.prlimit(d.pid, resource.RLIMIT_FSIZE, UNLIMITED)
        await _recorded(old, pids_of(held))
        assert d.stop() == 0
    close_all(v0 + held + after)
    in_old, in_new = by_pid(read_records(old)), by_pid(read_records(new))
    assert all(in_old[p] == ["terminated"] for p in pids_of(v0 + held)), in_old
    assert in_new == {pids_of(after)[0]: ["terminated"]}, in_new
    assert size(tmp_path / "old.jsonl.intent") == 0, "the old journal was left unsettled"
