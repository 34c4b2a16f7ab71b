"""The systemd sd_notify protocol, stdlib only.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: the path of an
``AF_UNIX`` datagram socket (or, with a leading ``@``, an abstract socket name).
The service reports its state by sending datagrams of ``KEY=VALUE`` lines:
``READY=1`` once it serves, ``RELOADING=1`` (with ``MONOTONIC_USEC=``) while it
reloads, ``STOPPING=1`` on shutdown, ``WATCHDOG=1`` as a keep-alive ping and
``STATUS=`` as a free-form line shown by ``systemctl status``.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, and no call ever
raises: a lost notification must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("watchdog.notify")  # the name log filters know

_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str | None:
    """Turn a NOTIFY_SOCKET value into an AF_UNIX address, or None if unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _one_line(text: str) -> str:
    """Flatten a value so it cannot inject extra KEY=VALUE lines."""
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify messages to the service manager (a no-op outside systemd)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        """Create a notifier for ``address`` (a NOTIFY_SOCKET value; None: disabled)."""
        self._notify_socket = address
        self._address = _socket_address(address) if address else None
        if address and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket; systemd notifications off", address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        env: Mapping[str, str] = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to send to."""
        return self._address is not None

    @property
    def notify_socket(self) -> str | None:
        """The NOTIFY_SOCKET value this notifier was built from."""
        return self._notify_socket

    def send(self, *lines: str) -> None:
        """Send ``KEY=VALUE`` lines as one datagram; never raises."""
        if self._address is None or not lines:
            return
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Bounded: a stalled receiver must not freeze the daemon's event loop.
                sock.settimeout(_SEND_TIMEOUT)
                sock.sendto(data, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd at %s: %s (further failures logged at debug level)",
                    self._notify_socket,
                    exc,
                )
            else:
                log.debug("cannot notify systemd at %s: %s", self._notify_socket, exc)

    def ready(self, status: str | None = None) -> None:
        """Report startup or a reload as finished (READY=1, optionally with STATUS=)."""
        if status is None:
            self.send("READY=1")
        else:
            self.send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        """Report that a reload has started (RELOADING=1 with MONOTONIC_USEC=)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Report that shutdown has started (STOPPING=1)."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Send a keep-alive ping (WATCHDOG=1)."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (STATUS=)."""
        self.send(f"STATUS={_one_line(text)}")

    def watchdog_period(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked."""
        if self._watchdog_usec is None:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid is not None:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1e6
