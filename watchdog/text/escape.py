"""Text from servers and poolers made safe to write: JSON on one line, log records on one line.

Role, database and application names and query text are chosen by strangers. In JSON every
writer (the audit log, the intent journals, every ``--json``) goes through :func:`json_line`
or :func:`json_text`: control characters, line and paragraph separators, bidi controls and
lone surrogates become ``\\uXXXX`` escapes, which every JSON reader turns back into the same
text (the audit log stays lossless). Log records go through :class:`OneLineFormatter`: one
record, one line, whatever a message or a traceback holds.
"""

from __future__ import annotations

import json
import logging
import re

__all__ = ["OneLineFormatter", "json_line", "json_text", "log_text"]

# json.dumps(ensure_ascii=False) escapes C0 controls itself but leaves these raw: DEL and C1
# controls (\x85 is a line break to some tools, \x9b a CSI to some terminals), U+2028/U+2029
# (line breaks to str.splitlines and JavaScript), the bidi controls that reorder what a
# terminal shows (U+061C, U+200E/F, U+202A-E, U+2066-9), and lone surrogates.
_JSON_RAW = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_JSON_UNSAFE = re.compile(f"[{_JSON_RAW}]")
_LOG_UNSAFE = re.compile(f"[\x00-\x1f{_JSON_RAW}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


_ONE_LINE = json.JSONEncoder(ensure_ascii=False)


def json_text(value: object, indent: int | None = None) -> str:
    """``value`` as JSON, non-ASCII text readable, every unsafe character escaped."""
    if indent is None:
        text = _ONE_LINE.encode(value)
        if text.isascii() and "\x7f" not in text:
            return text  # nothing to escape: every other unsafe character is no ASCII
    else:
        text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _JSON_UNSAFE.sub(_json_escape, text)


def json_line(value: object) -> str:
    """``value`` as one JSON line (no newline at the end)."""
    return json_text(value)


def _log_escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def log_text(text: str) -> str:
    """``text`` on one line: line breaks, controls and bidi characters shown as escapes."""
    return _LOG_UNSAFE.sub(_log_escape, text)


class OneLineFormatter(logging.Formatter):
    """Formats a record, traceback included, as one line with every unsafe character escaped:
    a role named "x\\nINFO forged" cannot add a line to the journal."""

    def format(self, record: logging.LogRecord) -> str:
        return log_text(super().format(record))
