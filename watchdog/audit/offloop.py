"""Audit log calls from the event loop: off the loop, with a timeout of their own.

A slow audit disk is not a dead server. A sweep's server time budget (the runner's
``asyncio.timeout``) stops while it waits for the log, and the wait for the log has
its own bound, past which the sweep gets AuditError (fail closed: nothing more is
signalled) while the connection and the leader lock stay. A call that outlives its
wait is never cancelled: it keeps its place on the log's worker thread, so records
that were late are written once the disk answers, and intents that were late are
settled as not signalled by the AuditLog.abandon() queued behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from watchdog.audit.log import AuditError, AuditLog

T = TypeVar("T")

# An append is one write and one fsync: milliseconds. Past this the disk is in trouble.
AUDIT_TIMEOUT = 5.0


def stalled(audit: AuditLog) -> str:
    """The one-line message of a log whose write has not finished in time (always the same
    text for one log, so an alert about it is not repeated each sweep)."""
    return (
        f"cannot write audit log {audit.path}: a write has not finished within "
        f"{AUDIT_TIMEOUT:g}s (slow or stalled disk, or the log locked by another process)"
    )


def is_stalled(audit: AuditLog) -> bool:
    """Whether the log's worker has been inside one call for longer than AUDIT_TIMEOUT."""
    since = audit.busy_since
    return since is not None and time.monotonic() - since > AUDIT_TIMEOUT


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A late call's failure is the log's business (kept in its backlog); never "unretrieved".
    if not fut.cancelled():
        fut.exception()


@contextlib.asynccontextmanager
async def paused(budget: asyncio.Timeout | None) -> AsyncIterator[None]:
    """The sweep's server timeout stopped for the block: local work is not the server's time."""
    loop = asyncio.get_running_loop()
    deadline = budget.when() if budget is not None and not budget.expired() else None
    if budget is not None and deadline is not None:
        budget.reschedule(None)
    started = loop.time()
    try:
        yield
    finally:
        if budget is not None and deadline is not None and not budget.expired():
            budget.reschedule(deadline + (loop.time() - started))


async def call(
    audit: AuditLog,
    fn: Callable[..., T],
    *args: Any,
    budget: asyncio.Timeout | None = None,
) -> T:
    """`fn(*args)` on the log's worker; AuditError after AUDIT_TIMEOUT (it still runs later).

    `budget`: the sweep's server timeout, paused while the log is written.
    """
    async with paused(budget):
        fut = asyncio.wrap_future(audit.submit(fn, *args))
        fut.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(AUDIT_TIMEOUT):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise AuditError(stalled(audit)) from None
