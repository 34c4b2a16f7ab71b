"""Query text without its secrets: constants become $n placeholders, the statement's shape stays.

A scanner that follows PostgreSQL's lexer (scan.l): string constants in every form ('...',
E'...', N'...', U&'...', B'...', X'...', $tag$...$tag$), numbers, and the argument of PASSWORD
in role statements become ``$1``, ``$2``, ... numbered after the statement's own parameters,
as pg_stat_statements normalizes. Identifiers (quoted too), keywords, operators and parameters
stay. Comments become ``/*...*/``: their text can hold anything, and per-request tags in them
would split one shape into many. Runs of whitespace become one space, so statements that
differ only in whitespace between tokens (or in constants) come out the same.

The text is written by strangers and may be a megabyte long or cut short by the server: every
step is linear (possessive regexes, ``str.find``), and whatever is left open at the end (a
literal, a comment) is redacted to the end. A backslash before a quote means one thing with
standard_conforming_strings on and another with it off, and the session's setting is unknown:
both readings are scanned and what either takes for a constant is redacted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from watchdog.text.comments import block_end

__all__ = ["redact"]

_START = "A-Za-z_\x80-\U0010ffff"  # PostgreSQL's ident_start: any non-ASCII character too
_CONT = _START + "0-9$"
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_WS = r"[ \t\n\r\f\v]"
_PLAIN = r"'(?:[^']++|'')*+'?"  # '' doubles a quote; no closing quote: open to the end
_ESCAPED = r"'(?:[^'\\]++|''|\\.?)*+'?"  # E'...': a backslash escapes the next character
_QUOTED_NAME = r'"(?:[^"]++|"")*+"'
_OPEN_NAME = r'(?:[uU]&)?"(?:[^"]++|"")*+"?'  # U&"...", or cut short: a name to the end
# Decimal, hex, octal and binary numbers with _ separators (16+), and any junk glued to them.
_NUMBER = (
    r"(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?|\.[0-9][0-9_]*+)(?:[eE][+-]?[0-9]++)?"
    rf"[{_START}0-9]*+"
)
# A name kept as it is: not PASSWORD, not the prefix of a constant (E'...', U&"...").
_NAME = rf"(?!(?i:password)(?![{_CONT}])|[eEnNbBxX]'|[uU]&['\"])[{_START}][{_CONT}]*+"
# Operators, punctuation and stray characters that start no comment and no statement.
_PUNCT = r"(?:[+*<>=~!@#%^&|`?(),\[\]:{}\\\x00-\x08\x0e-\x1f\x7f]|-(?!-)|/(?!\*)|\.(?![0-9]))"
_COMMENT = "/*...*/"
# Closed strings, standard reading (the E'...' prefix after no name character, as in a run).
_STRINGS = rf"(?<![{_CONT}])[eE]'(?:[^'\\]++|''|\\.)*+'|'(?:[^']++|'')*+'"
# An odd run of backslashes before a quote: the only text the two readings split differently.
_AMBIGUOUS = re.compile(r"(?<!\\)(?:\\\\)*+\\'")


def _pattern(backslash_quotes: bool, fast: bool) -> re.Pattern[str]:
    """The token regex. ``fast``: strings, numbers and parameters go inside runs of kept
    tokens (most of a statement in one match), replaced there afterwards; a text the two
    readings split differently is scanned token by token, to compare them.
    ``backslash_quotes``: the legacy reading, as with standard_conforming_strings off."""
    run = [_NAME, _QUOTED_NAME, _PUNCT]
    if fast:
        run[2:2] = [_STRINGS, _NUMBER, r"\$[0-9]++"]
    kept = "(?:" + "|".join(run) + ")"
    plain = _ESCAPED if backslash_quotes else _PLAIN
    alternatives = (
        rf"(?P<run>{kept}(?:{_WS}*+{kept})*+)",
        rf"(?P<ws>{_WS}++)",
        r"(?P<comment>--[^\n\r]*+)",
        r"(?P<block>/\*)",
        rf"(?P<const>[eE]{_ESCAPED})",
        rf"(?P<plain>[nN]?{plain})",
        rf"(?P<bits>(?:[bBxX]|[uU]&){_PLAIN})",
        rf"(?P<name>{_OPEN_NAME})",
        r"(?P<param>\$[0-9]++)",
        rf"(?P<dollar>\$(?:[{_START}][A-Za-z_0-9\x80-\U0010ffff]*+)?\$)",
        rf"(?P<num>{_NUMBER})",
        rf"(?P<word>[{_START}][{_CONT}]*+)",
        r"(?P<other>.)",
    )
    return re.compile("|".join(alternatives), re.DOTALL)


_FAST = _pattern(backslash_quotes=False, fast=True)
_STANDARD = _pattern(backslash_quotes=False, fast=False)
_LEGACY = _pattern(backslash_quotes=True, fast=False)
_SECRETS = frozenset({"const", "plain", "bits", "dollar", "num", "secret"})
_HIDDEN = _SECRETS | {"comment", "block"}
# Inside a run: the constants to replace, and quoted names to step over.
_RUN_CONSTANTS = re.compile(rf"{_STRINGS}|(?<![{_CONT}]){_NUMBER}", re.DOTALL)
_RUN_PARTS = re.compile(rf"({_QUOTED_NAME})|{_STRINGS}|(?<![{_CONT}]){_NUMBER}", re.DOTALL)
_RUN_PARAMS = re.compile(rf"{_QUOTED_NAME}|{_STRINGS}|(?<![{_CONT}])\$([0-9]++)", re.DOTALL)
_RUN_UNTIDY = re.compile(r"[\t\n\r\f\v]|  ")
_RUN_SPACES = re.compile(rf"({_QUOTED_NAME}|{_STRINGS})|{_WS}++", re.DOTALL)
_ARGUMENT = re.compile(rf"{_OPEN_NAME}|[{_START}][{_CONT}]*+")
_ROLE_STATEMENT = re.compile(
    r"(?:[ \t\n\r\f\v]++|--[^\n\r]*+|/\*(?:[^*]++|\*(?!/))*+\*/)*+"
    rf"(?i:CREATE|ALTER)[ \t\n\r\f\v]++(?i:ROLE|USER|GROUP)(?![{_CONT}])"
)
# PASSWORD right after these is a role's name: ALTER ROLE password RENAME TO ...
_NAMED_BEFORE = re.compile(rf"(?<![{_CONT}])(?i:ROLE|USER|GROUP|TO)[ \t\n\r\f\v]++\Z")


def _scan(text: str, pattern: re.Pattern[str]) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of each token; a role's PASSWORD argument written as a name (PASSWORD
    x or "x": a typo the server rejects, yet shows in pg_stat_activity) is kind ``secret``."""
    pos, n, match = 0, len(text), pattern.match
    statement = 0  # where the current statement starts
    role_statement = (-1, False)  # (statement, whether it is CREATE/ALTER ROLE/USER/GROUP)
    password = False  # the last name was a role's PASSWORD keyword
    while pos < n:
        m = match(text, pos)
        assert m is not None  # "other" matches any character
        kind, start, pos = m.lastgroup or "other", pos, m.end()
        if kind == "block":
            end = block_end(text, start)
            pos = n if end < 0 else end  # an unclosed comment runs to the end
        elif kind == "dollar":
            close = text.find(m.group(), pos)
            pos = n if close < 0 else close + pos - start
        elif kind in ("ws", "comment"):
            pass
        elif password and kind in ("run", "name", "word"):
            arg = _ARGUMENT.match(text, start)
            if arg is not None and arg.group().upper() != "NULL":
                kind, pos = "secret", arg.end()
            password = False
        elif kind == "word" and m.group().upper() == "PASSWORD":
            if role_statement[0] != statement:
                role_statement = (statement, bool(_ROLE_STATEMENT.match(text, statement)))
            before = _NAMED_BEFORE.search(text, max(statement, start - 32), start)
            password = role_statement[1] and before is None
        else:
            password = False
            if kind == "other" and m.group() == ";":
                statement = pos
        yield kind, start, pos


def _legacy_spans(text: str) -> Iterator[tuple[int, int]]:
    """What the standard_conforming_strings=off reading hides, then an endless sentinel."""
    for kind, start, end in _scan(text, _LEGACY):
        if kind in _HIDDEN:
            yield start, end
    while True:
        yield len(text), len(text) + 1


def _sentinel(text: str) -> str | None:
    """A character ``text`` does not contain (a private-use one, as a rule): each placeholder
    until they are numbered. None only for a text holding every character from U+E000 up."""
    if "\ue000" not in text:
        return "\ue000"
    used = set(text)
    return next((c for c in map(chr, range(0xE001, 0x110000)) if c not in used), None)


def _param(digits: str) -> int:
    """A parameter's number; 0 for more digits than PostgreSQL's int (not a parameter)."""
    return int(digits) if len(digits) <= 10 else 0


def _word_end(piece: str) -> bool:
    """Whether a name or number written after ``piece`` would run into it."""
    return piece[-1] in _ASCII_WORD or not piece[-1].isascii()


class _Out:
    """The redacted text being built; each placeholder is the sentinel until numbered."""

    def __init__(self, sentinel: str) -> None:
        self.pieces: list[str] = []
        self.sentinel = sentinel
        self.space = False  # whitespace or a comment since the last piece
        self.masked = False  # the last placeholder stands for what the legacy reading hides
        # Between a placeholder and a name, number or placeholder right after or before it.
        self.glued = re.compile(rf"(?<={sentinel})(?=[{_CONT}])|(?<=[{_CONT}])(?={sentinel})")

    def text(self, text: str) -> None:
        """Kept text (with placeholders inside a run already)."""
        pieces = self.pieces
        # Placeholders count as names here: "abc$1", "$1$2" or "$$1" would read differently.
        if self.space or (pieces and _word_end(pieces[-1]) and _word_end(text[0])):
            pieces.append(" ")
        pieces.append(text)
        self.space = self.masked = False

    def placeholder(self, masked: bool = False) -> None:
        """A placeholder; ``masked``: for what only the legacy reading hides (runs merge)."""
        pieces = self.pieces
        if (masked or self.masked) and not self.space and pieces[-1:] == [self.sentinel]:
            self.masked = True
            return
        if self.space or (pieces and _word_end(pieces[-1])):
            pieces.append(" ")  # "abc$1" would read as one name
        pieces.append(self.sentinel)
        self.space, self.masked = False, masked

    def run(self, text: str) -> None:
        """A run of kept tokens: its whitespace tidied, its strings and numbers replaced."""
        sentinel = self.sentinel
        if _RUN_UNTIDY.search(text):
            text = _RUN_SPACES.sub(lambda m: m.group(1) or " ", text)
        if '"' in text:
            text = _RUN_PARTS.sub(lambda m: m.group(1) or sentinel, text)
        else:
            text = _RUN_CONSTANTS.sub(sentinel, text)
        if sentinel in text:
            text = self.glued.sub(" ", text)
        self.text(text)

    def result(self, first: int) -> str:
        """The text, placeholders numbered from ``first``."""
        parts = "".join(self.pieces).split(self.sentinel)
        numbers = [f"${i}" for i in range(first, first + len(parts) - 1)]
        numbers.append("")
        return "".join([p for pair in zip(parts, numbers, strict=True) for p in pair])


def redact(query: str) -> str:
    """``query`` with every constant replaced by a $n placeholder; deterministic, idempotent."""
    n = len(query)
    legacy = _legacy_spans(query) if _AMBIGUOUS.search(query) else None
    masked_from, masked_to = next(legacy) if legacy is not None else (n, n + 1)
    sentinel = _sentinel(query)
    if sentinel is None:
        return "$1"  # nothing can stand for a placeholder: keep nothing rather than guess
    out = _Out(sentinel)
    max_param = 0
    for kind, start, end in _scan(query, _FAST if legacy is None else _STANDARD):
        while masked_to <= start:
            masked_from, masked_to = next(legacy)  # type: ignore[arg-type]
        if masked_from < end and (masked_from, masked_to) != (start, end):
            out.placeholder(masked=True)
        elif kind == "run":
            text = query[start:end]
            out.run(text)
            if "$" in text:
                params = (_param(p) for p in _RUN_PARAMS.findall(text) if p)
                max_param = max(max_param, *params, 0)
        elif kind == "ws":
            out.space = bool(out.pieces)
        elif kind in _SECRETS:
            out.placeholder()
        elif kind == "comment" or kind == "block":
            out.text(_COMMENT)
        else:
            text = query[start:end]
            if kind == "param":
                max_param = max(max_param, _param(text[1:]))
            out.text(text)
    return out.result(max_param + 1)
