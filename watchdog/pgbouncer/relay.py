"""Every byte a pooler's console sends passes through a meter on the event loop.

libpq reads a long message in one call, and psycopg makes that call holding the GIL: a
console that announces one row of a gigabyte and sends it fast would be read whole, the
whole process frozen meanwhile, before any cap could be checked between two calls. So once
psycopg has connected (TLS and authentication done), the connection's descriptor is swapped
under libpq for one end of a socketpair, and the event loop relays the real socket to it.
libpq can then read only what the relay has passed, at most a socketpair's buffer per call,
and the relay passes no more than the answer's byte budget: past it, libpq sees the end of
the stream. TLS is unaffected (the relay carries its records; libpq keeps the same
descriptor number), and the bytes are counted as they arrive, ciphertext included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

CHUNK = 65536


class Relay:
    """The relay of one console connection; ``allow`` opens a budget for one answer."""

    def __init__(self, fd: int) -> None:
        self.real = socket.socket(fileno=os.dup(fd))  # the pooler's socket, now the relay's
        inner, self.outer = socket.socketpair()
        inner.setblocking(False)  # libpq's side: non-blocking, as libpq set its own
        os.dup2(inner.fileno(), fd)  # libpq's descriptor number now names the socketpair
        inner.close()
        self.real.setblocking(False)
        self.outer.setblocking(False)
        self.budget = 0  # bytes the relay may still pass from the pooler
        self.exhausted = False  # the budget ran out in the middle of an answer
        self._open = asyncio.Event()
        self._tasks = [asyncio.create_task(self._down()), asyncio.create_task(self._up())]

    @property
    def alive(self) -> bool:
        return not any(t.done() for t in self._tasks)

    def allow(self, budget: int) -> None:
        """Let ``budget`` bytes of the pooler's next answer through (0: none)."""
        self.budget, self.exhausted = budget, False
        if budget > 0:
            self._open.set()
        else:
            self._open.clear()

    async def _down(self) -> None:
        """Pooler -> libpq, within the budget. Between answers nothing is read, so whatever a
        console sends unasked waits in the kernel's buffers, not in this process."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._open.wait()
                data = await loop.sock_recv(self.real, min(CHUNK, self.budget))
                if not data:
                    break
                self.budget -= len(data)
                await loop.sock_sendall(self.outer, data)
                if self.budget <= 0:
                    self.exhausted = True
                    break
        except OSError:
            pass
        finally:
            # libpq sees the end of the stream: an error for an answer it was still reading.
            with contextlib.suppress(OSError):
                self.outer.shutdown(socket.SHUT_WR)

    async def _up(self) -> None:
        """libpq -> pooler: the queries."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(self.outer, CHUNK):
                await loop.sock_sendall(self.real, data)

    async def close(self) -> None:
        """Stop relaying and close both sockets this relay holds (libpq closes its own)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.real.close()
        self.outer.close()
