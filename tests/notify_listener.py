"""A stand-in for systemd's notify socket, for tests.

``NotifyListener`` binds a real ``AF_UNIX`` datagram socket (a path in a fresh
temp dir, or an abstract name) and collects what a process sends to it, the way
PID 1 does for a ``Type=notify`` service. Pass ``listener.env()`` as
``NOTIFY_SOCKET`` (or ``listener.environ()`` merged into a child's environment)
and then check the messages:

    with NotifyListener() as listener:
        proc = await asyncio.create_subprocess_exec(..., env={**os.environ, **listener.environ()})
        ready = await listener.expect("READY", timeout=30)
        proc.send_signal(signal.SIGHUP)
        reloading = await listener.expect("RELOADING", timeout=10)
        await listener.expect("READY", timeout=10)

``expect`` never blocks the event loop: it waits with ``loop.add_reader`` on the
non-blocking socket. ``recv`` is the blocking counterpart for synchronous tests.
Each message is a dict of its ``KEY=VALUE`` lines; ``raw`` keeps the bytes and
``pids`` the sender's pid (from ``SCM_CREDENTIALS``, as systemd checks it for
``NotifyAccess=main``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import shutil
import socket
import struct
import tempfile
import time
from types import TracebackType

__all__ = ["NotifyListener", "parse_message"]

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_BUFSIZE = 64 * 1024


def parse_message(data: bytes) -> dict[str, str]:
    """Parse one notify datagram into a dict of its KEY=VALUE lines."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class NotifyListener:
    """A bound notify socket that records every datagram sent to it."""

    def __init__(
        self, *, abstract: bool = False, directory: str | None = None, shared: bool = False
    ) -> None:
        """Bind a socket: a path in a new temp dir (under ``directory``) or an abstract name.

        ``shared=True`` lets processes of other users (a daemon run as an
        unprivileged user) send to the path socket.
        """
        self.messages: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self.pids: list[int | None] = []
        self._cursor = 0
        self._dir: str | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.setblocking(False)
            if abstract:
                name = f"pg-watchdog-test/{os.getpid()}/{secrets.token_hex(8)}"
                self._sock.bind("\0" + name)
                self._value = "@" + name
            else:
                # Short prefix: AF_UNIX paths are limited to 107 bytes.
                self._dir = tempfile.mkdtemp(prefix="pgwd-notify-", dir=directory)
                path = os.path.join(self._dir, "notify.sock")
                self._sock.bind(path)
                self._value = path
                if shared:
                    os.chmod(self._dir, 0o755)
                    os.chmod(path, 0o777)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------

    def env(self) -> str:
        """The NOTIFY_SOCKET value that reaches this listener."""
        return self._value

    def environ(self, **extra: str) -> dict[str, str]:
        """``{"NOTIFY_SOCKET": ...}`` plus ``extra`` (e.g. ``WATCHDOG_USEC="2000000"``)."""
        return {"NOTIFY_SOCKET": self._value, **extra}

    @property
    def path(self) -> str | None:
        """The socket's file path (None for an abstract socket)."""
        return None if self._dir is None else self._value

    # -- receiving ---------------------------------------------------------

    def drain(self) -> int:
        """Collect every datagram already queued, without blocking; return how many."""
        count = 0
        while True:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(
                    _BUFSIZE, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return count
            pid: int | None = None
            for level, kind, payload in ancdata:
                if (
                    level == socket.SOL_SOCKET
                    and kind == socket.SCM_CREDENTIALS
                    and len(payload) >= _UCRED.size
                ):
                    pid = _UCRED.unpack_from(payload)[0]
            self.raw.append(data)
            self.messages.append(parse_message(data))
            self.pids.append(pid)
            count += 1

    def _take(self, key: str, value: str | None) -> dict[str, str] | None:
        """Return the first unconsumed message with ``key`` (and ``value``), consuming it."""
        for index in range(self._cursor, len(self.messages)):
            message = self.messages[index]
            if key in message and (value is None or message[key] == value):
                self._cursor = index + 1
                return message
        return None

    def _missing(self, key: str, value: str | None, timeout: float) -> AssertionError:
        wanted = key if value is None else f"{key}={value}"
        return AssertionError(
            f"no {wanted} on {self._value} within {timeout}s; received: {self.messages}"
        )

    async def expect(
        self,
        key: str,
        timeout: float = 10.0,
        *,
        value: str | None = None,
    ) -> dict[str, str]:
        """Wait (without blocking the loop) for the next message carrying ``key``.

        Messages are consumed in order: a second ``expect("READY")`` only matches a
        READY sent after the one the first call returned. Raises AssertionError,
        listing what did arrive, on timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fd = self._sock.fileno()
        while True:
            self.drain()
            found = self._take(key, value)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._missing(key, value, timeout)
            readable = loop.create_future()

            def wake(fut: asyncio.Future[None] = readable) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(readable, remaining)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)

    def recv(self, key: str | None = None, timeout: float = 5.0) -> dict[str, str]:
        """Blocking: the next unconsumed message (carrying ``key``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if key is not None:
                found = self._take(key, None)
            elif self._cursor < len(self.messages):
                found = self.messages[self._cursor]
                self._cursor += 1
            else:
                found = None
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._missing(key or "message", None, timeout)
            select.select([self._sock], [], [], remaining)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the socket and remove its temp dir."""
        self._sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
