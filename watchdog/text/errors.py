"""An exception as the one line a user sees: the reason alone, without the caller's context."""

from __future__ import annotations


def reason(exc: BaseException) -> str:
    """``timed out``; an OS error's strerror; else the first line of the text; else the type.

    Text that may hold a secret or a stranger's bytes is the caller's to scrub or escape.
    """
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # libpq's and asyncpg's messages run over several lines; the first says what happened.
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
