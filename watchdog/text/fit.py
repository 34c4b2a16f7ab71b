"""Text from strangers fitted to a terminal column: escaped, cut to a width of cells."""

from __future__ import annotations

import functools
import unicodedata

ELLIPSIS = "…"
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Controls, format characters (bidi overrides, zero-width), lone surrogates, line separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _char(ch: str) -> tuple[str, int]:
    """How one character is shown, and how many terminal cells it takes."""
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch], 2
    if unicodedata.category(ch) in _ESCAPED_CATEGORIES:
        code = ord(ch)
        shown = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        if code > 0xFFFF:
            shown = f"\\U{code:08x}"
        return shown, len(shown)
    if unicodedata.combining(ch):
        return ch, 0
    return ch, 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


@functools.lru_cache(maxsize=16384)
def fit(value: str, width: int) -> tuple[str, int]:
    """`value` escaped and cut to at most `width` cells (ellipsis when cut); its cell count."""
    if value.isascii() and value.isprintable():
        if len(value) <= width:
            return value, len(value)
        return value[: width - 1] + ELLIPSIS, width
    pieces: list[tuple[str, int]] = []
    used = 0
    for ch in value:
        piece = _char(ch)
        pieces.append(piece)
        used += piece[1]
        if used > width:
            break
    else:
        return "".join(p for p, _ in pieces), used
    while pieces and used > width - 1:
        used -= pieces.pop()[1]
    return "".join(p for p, _ in pieces) + ELLIPSIS, used + 1
