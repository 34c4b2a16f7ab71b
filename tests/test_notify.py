"""watchdog.service.notify against real AF_UNIX datagram sockets (no systemd needed)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest
from notify_listener import NotifyListener, parse_message

from watchdog.service.notify import Notifier


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    with NotifyListener() as bound:
        yield bound


@pytest.fixture
def notifier(listener: NotifyListener) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": listener.env()})


# -- what each method sends ----------------------------------------------------


def test_enabled_with_a_socket(notifier: Notifier, listener: NotifyListener) -> None:
    assert notifier.enabled
    assert notifier.notify_socket == listener.env()
    assert listener.path is not None and os.path.exists(listener.path)


def test_ready(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.ready()
    assert listener.recv() == {"READY": "1"}
    assert listener.raw == [b"READY=1"]


def test_ready_with_status_is_one_datagram(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.ready("watching 2 targets")
    assert listener.recv() == {"READY": "1", "STATUS": "watching 2 targets"}
    assert listener.raw == [b"READY=1\nSTATUS=watching 2 targets"]


def test_reloading_sends_monotonic_usec_in_the_same_datagram(
    notifier: Notifier, listener: NotifyListener
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = listener.recv()
    assert set(message) == {"RELOADING", "MONOTONIC_USEC"}
    assert message["RELOADING"] == "1"
    assert message["MONOTONIC_USEC"].isdigit()
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    assert len(listener.raw) == 1


def test_reload_sequence(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.reloading()
    notifier.ready("policies reloaded")
    assert "RELOADING" in listener.recv()
    assert listener.recv() == {"READY": "1", "STATUS": "policies reloaded"}


def test_stopping(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.stopping()
    assert listener.recv() == {"STOPPING": "1"}


def test_watchdog_ping(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.watchdog()
    notifier.watchdog()
    assert listener.recv() == {"WATCHDOG": "1"}
    assert listener.recv() == {"WATCHDOG": "1"}


def test_status(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.status("sweep 12: terminated 3 sessions on main")
    assert listener.recv() == {"STATUS": "sweep 12: terminated 3 sessions on main"}


def test_status_cannot_inject_lines(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.status("bad\nREADY=1")
    assert listener.recv() == {"STATUS": "bad READY=1"}


def test_send_joins_lines_into_one_datagram(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.send("STATUS=sweeping", "ERRNO=0", "EXTEND_TIMEOUT_USEC=5000000")
    assert listener.raw == []
    listener.recv()
    assert listener.raw == [b"STATUS=sweeping\nERRNO=0\nEXTEND_TIMEOUT_USEC=5000000"]


def test_send_without_lines_sends_nothing(notifier: Notifier, listener: NotifyListener) -> None:
    notifier.send()
    notifier.status("after")
    assert listener.recv() == {"STATUS": "after"}
    assert len(listener.raw) == 1


def test_sender_is_this_process(notifier: Notifier, listener: NotifyListener) -> None:
    # systemd matches the sender's pid (SCM_CREDENTIALS) for NotifyAccess=main.
    notifier.ready()
    listener.recv()
    assert listener.pids == [os.getpid()]


def test_shared_listener_is_reachable_by_other_users() -> None:
    with NotifyListener(shared=True) as shared:
        assert shared.path is not None
        assert os.stat(shared.path).st_mode & 0o002
        assert os.stat(os.path.dirname(shared.path)).st_mode & 0o001
        Notifier.from_env({"NOTIFY_SOCKET": shared.env()}).ready()
        assert shared.recv() == {"READY": "1"}


def test_abstract_socket() -> None:
    with NotifyListener(abstract=True) as abstract:
        assert abstract.env().startswith("@")
        assert abstract.path is None
        notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract.env()})
        assert notifier.enabled
        notifier.ready("up")
        notifier.watchdog()
        assert abstract.recv() == {"READY": "1", "STATUS": "up"}
        assert abstract.recv() == {"WATCHDOG": "1"}


def test_from_env_reads_os_environ(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env())
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.watchdog_period() == 2.0
    notifier.stopping()
    assert listener.recv() == {"STOPPING": "1"}


# -- disabled ------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}])
def test_noop_without_notify_socket(environ: dict[str, str]) -> None:
    notifier = Notifier.from_env(environ)
    assert not notifier.enabled
    notifier.ready("up")
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.send("READY=1")


def test_noop_when_os_environ_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled


def test_unsupported_socket_kind_is_disabled_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="watchdog.notify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()
    assert "vsock:2:1234" in caplog.text


# -- failures never raise ---------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "watchdog.notify" and r.levelno >= logging.WARNING
    ]


def test_socket_that_no_longer_exists_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    listener = NotifyListener()
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.env()})
    listener.close()  # removes the socket file and its directory
    with caplog.at_level(logging.DEBUG, logger="watchdog.notify"):
        notifier.ready()
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()
    warnings = _warnings(caplog)
    assert len(warnings) == 1, "warns once, then only at debug level"
    assert listener.env() in warnings[0].getMessage()


def test_socket_file_without_a_reader_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryDirectory(prefix="pgwd-") as tmp:
        path = os.path.join(tmp, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
            dead.bind(path)
        # The file is still there but nobody is bound: ECONNREFUSED.
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        with caplog.at_level(logging.WARNING, logger="watchdog.notify"):
            notifier.watchdog()
            notifier.watchdog()
    assert len(_warnings(caplog)) == 1


def test_abstract_socket_without_a_reader_does_not_raise() -> None:
    Notifier.from_env({"NOTIFY_SOCKET": "@pg-watchdog-test/nobody-here"}).ready()


# -- the watchdog period -----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "period"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "60s"}, None),
        ({}, None),
    ],
)
def test_watchdog_period(environ: dict[str, str], period: float | None) -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/nowhere", **environ}).watchdog_period() == (
        period
    )


def test_watchdog_period_without_notify_socket() -> None:
    # The period comes from WATCHDOG_USEC alone; sending is what NOTIFY_SOCKET governs.
    assert Notifier.from_env({"WATCHDOG_USEC": "2000000"}).watchdog_period() == 1.0


# -- the listener helper, from async code ------------------------------------------


async def test_listener_expect_does_not_block_the_loop(listener: NotifyListener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.env()})
    steps = [lambda: notifier.status("starting"), lambda: notifier.ready("up"),
             notifier.reloading, lambda: notifier.ready("reloaded")]

    async def sender() -> None:
        # Only a running loop sends, a few ticks apart: if expect() blocked it, nothing
        # would arrive and expect() would time out.
        for step in steps:
            for _ in range(5):
                await asyncio.sleep(0.01)
            step()

    task = asyncio.create_task(sender())
    try:
        assert (await listener.expect("READY", timeout=30))["STATUS"] == "up"
        assert "MONOTONIC_USEC" in await listener.expect("RELOADING", timeout=30)
        assert (await listener.expect("READY", timeout=30))["STATUS"] == "reloaded"
    finally:
        task.cancel()
    assert [m.get("STATUS") for m in listener.messages] == [
        "starting",
        "up",
        None,
        "reloaded",
    ]


async def test_listener_expect_times_out_with_what_it_saw(listener: NotifyListener) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": listener.env()}).status("booting")
    with pytest.raises(AssertionError, match="booting"):
        await listener.expect("READY", timeout=0.1)


async def test_listener_expect_value(listener: NotifyListener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.env()})
    notifier.status("one")
    notifier.status("two")
    assert await listener.expect("STATUS", value="two", timeout=1) == {"STATUS": "two"}


def test_parse_message() -> None:
    assert parse_message(b"READY=1\nSTATUS=a=b\n\nnoise") == {"READY": "1", "STATUS": "a=b"}
