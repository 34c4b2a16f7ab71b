"""Helpers for the fault tests: victims, the server's own account of kills, record checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from helpers import connect, proxy_login

from watchdog.audit.journal import journals
from watchdog.commands.demo.tempcluster import TempCluster

VICTIM_APP = "victim"
OUTCOMES = {
    "terminated", "cancelled", "would_terminate", "would_cancel", "skipped_changed", "gone",
    "failed",
    # Not an outcome a sweep decides on, but written by audit.recover() and by a sweep interrupted
    # mid-statement: the signal may have gone out, nobody saw the result.
    "unconfirmed",
}
SIGNALLED = {"terminated", "unconfirmed"}
_ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_ADMIN_KILL = re.compile(
    r"\[(\d+)\] \S* ?FATAL:  terminating connection due to administrator command"
)


async def open_victims(cluster: TempCluster, n: int, batch: int = 25) -> list[asyncpg.Connection]:
    """``n`` idle sessions of role app (application 'victim'), opened ``batch`` at a time."""
    conns: list[asyncpg.Connection] = []
    while len(conns) < n:
        k = min(batch, n - len(conns))
        conns += await asyncio.gather(
            *(connect(cluster, "app", application_name=VICTIM_APP) for _ in range(k))
        )
    for c in conns:
        _PIDS[id(c)] = c.get_server_pid()
    return conns


_PIDS: dict[int, int] = {}  # id(connection) -> backend pid, still known after it is closed


def pids_of(conns: Iterable[asyncpg.Connection]) -> list[int]:
    return [_PIDS[id(c)] for c in conns]


async def alive(cluster: TempCluster, pids: Iterable[int]) -> set[int]:
    """Which of ``pids`` are backends in pg_stat_activity now (asked as the superuser)."""
    conn = await connect(cluster, "postgres", application_name="psql")
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
        )
    finally:
        await conn.close()
    return {r["pid"] for r in rows}


def close_all(conns: Iterable[asyncpg.Connection]) -> None:
    for c in conns:
        c.terminate()


def admin_kills(cluster: TempCluster) -> set[int]:
    """Pids the server log says were terminated by SIGTERM (pg_terminate_backend, or fast stop)."""
    text = cluster.log_path.read_text(errors="replace")
    return {int(m.group(1)) for m in _ADMIN_KILL.finditer(text)}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The audit log's records, skipping blank and torn lines (as `pg-watchdog audit` does)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def check_record(r: Mapping[str, Any]) -> None:
    """One audit record has every field of the audit format, each well-formed."""
    for key in ("ts", "target", "policy", "action", "dry_run", "outcome", "error", "pid",
                "backend_start", "usename", "datname", "application_name", "client_addr",
                "state", "state_change", "xact_start", "query_start", "age_s", "query",
                "server", "watchdog_host"):
        assert key in r, (key, r)
    assert _ISO_MS.match(r["ts"]), r
    assert r["action"] in ("terminate", "cancel"), r
    assert isinstance(r["dry_run"], bool), r
    assert r["outcome"] in OUTCOMES, r
    assert isinstance(r["pid"], int) and r["pid"] > 0, r
    assert r["backend_start"] and _ISO_MS.match(r["backend_start"]), r
    assert r["state_change"] and _ISO_MS.match(r["state_change"]), r
    assert isinstance(r["age_s"], int | float) and r["age_s"] >= 0, r
    assert re.match(r"^.+:\d+$", r["server"]), r
    if r["outcome"] in ("failed", "unconfirmed"):
        assert r["error"], r
    else:
        assert r["error"] is None, r


def check_log(records: list[dict[str, Any]]) -> None:
    """Every record valid, at most one final record per (sweep, pid), none left as 'intent'."""
    for r in records:
        check_record(r)
    dups = [k for k, n in Counter((r.get("sweep"), r["pid"]) for r in records).items() if n > 1]
    assert not dups, f"duplicated records for one sweep: {dups}"


def by_pid(records: Iterable[Mapping[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in records:
        out.setdefault(r["pid"], []).append(r["outcome"])
    return out


def poll(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.0002) -> None:
    """Busy-poll a cheap synchronous predicate (for hitting a window of a few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({timeout:g} s)")
        time.sleep(step)


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def journal_size(audit: Path) -> int:
    """Bytes in every intent journal of audit log ``audit`` (0 when none is left)."""
    return sum(size(p) for p in journals(audit))


def journal_bytes(audit: Path) -> bytes:
    """The intent journals of ``audit``, concatenated."""
    out = b""
    for p in journals(audit):
        with contextlib.suppress(FileNotFoundError):
            out += p.read_bytes()
    return out


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m watchdog ARGS`` (the installed command's code), captured."""
    return subprocess.run(
        [sys.executable, "-m", "watchdog", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[bool]:
    """A tiny tmpfs at ``path`` (yields False if mounting is not permitted here)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                          "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up to ENOSPC with one file; its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, chunk)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


def _messages(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of the protocol messages in a chunk (after the startup packet)."""
    i = 0
    while i + 5 <= len(data):
        length = int.from_bytes(data[i + 1 : i + 5], "big")
        yield data[i : i + 1], data[i + 5 : i + 1 + length]
        i += 1 + length


class CutProxy:
    """A TCP proxy to a server that cuts the network once, at the worst moment: when the
    client binds and executes the first prepared statement whose text holds ``marker``, it
    forwards that, drops everything the server answers and closes both sides. The server
    runs the statement; the client never learns what it did. Later connections pass.

    ``silent``: the client's side is left open instead, answering nothing, as a network that
    dies without a word: the client waits until its own timeout gives up."""

    def __init__(self, host: str, port: int, marker: bytes, silent: bool = False) -> None:
        self.upstream = (host, port)
        self.marker = marker
        self.silent = silent
        self.port = 0
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        proxy_login(self.port, self.upstream[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        proxy_login(self.port, None)
        self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _executes_marked(self, data: bytes, names: set[bytes]) -> bool:
        """Whether ``data`` binds a statement whose parse carried the marker (noted in names)."""
        if self.cut.is_set() or not data[:1].isalpha():
            return False
        for kind, body in _messages(data):
            if kind == b"P" and self.marker in body:
                names.add(body.split(b"\0", 1)[0])
            elif kind == b"B" and names:
                _portal, rest = body.split(b"\0", 1)
                if rest.split(b"\0", 1)[0] in names:
                    return True
        return False

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.upstream)
        self._writers += [cw, sw]
        blackhole = asyncio.Event()
        names: set[bytes] = set()

        async def up() -> None:  # client -> server
            while data := await cr.read(65536):
                cutting = self._executes_marked(data, names)
                sw.write(data)
                await sw.drain()
                if cutting:
                    blackhole.set()
                    self.cut.set()
                    if not self.silent:
                        cw.close()  # the client sees its connection die mid-statement
                    await asyncio.sleep(0.5)  # the server runs the statement meanwhile
                    break
            sw.close()

        async def down() -> None:  # server -> client
            while data := await sr.read(65536):
                if not blackhole.is_set():
                    cw.write(data)
                    await cw.drain()
            if not (self.silent and blackhole.is_set()):
                cw.close()  # silent: left open until the proxy goes

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
