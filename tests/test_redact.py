"""watchdog.text.redact: a table of statements, properties over generated SQL and hostile text.

The properties: no literal's content (strings in every form, numbers, comments, the argument
of PASSWORD) survives, under either reading of backslashes (standard_conforming_strings on
or off), even cut short anywhere; the result is idempotent and does not depend on the amount
or kind of whitespace between tokens (where both readings agree on the tokens). Megabyte
hostile inputs must finish in linear time: the deadline below is generous for a linear
scanner, and hours away for a quadratic one.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from watchdog.text.redact import redact

TABLE = [
    # (query, redacted)
    ("ALTER ROLE app PASSWORD 'Sup3rS3cret!'", "ALTER ROLE app PASSWORD $1"),
    ("alter user \"Bob\" with encrypted password 'it''s' valid until '2030-01-01'",
     "alter user \"Bob\" with encrypted password $1 valid until $2"),
    ("CREATE ROLE x LOGIN PASSWORD Sup3r CONNECTION LIMIT 5",
     "CREATE ROLE x LOGIN PASSWORD $1 CONNECTION LIMIT $2"),
    ('CREATE USER x PASSWORD "Sup3r"', "CREATE USER x PASSWORD $1"),
    ("ALTER ROLE x PASSWORD /* new */ E'a\\'b'", "ALTER ROLE x PASSWORD /*...*/ $1"),
    ("ALTER ROLE x PASSWORD NULL", "ALTER ROLE x PASSWORD NULL"),
    ("ALTER ROLE password RENAME TO pw2", "ALTER ROLE password RENAME TO pw2"),
    ("ALTER ROLE password PASSWORD pw2", "ALTER ROLE password PASSWORD $1"),
    ("SELECT 1; ALTER GROUP g PASSWORD x", "SELECT $1; ALTER GROUP g PASSWORD $2"),
    ("SELECT password FROM users WHERE id = 4111111111111111",
     "SELECT password FROM users WHERE id = $1"),
    ("INSERT INTO cards VALUES ('4111111111111111', 4111111111111111, 1.5e-3, .5, 0x1F,"
     " 0o17, 0b101, 1_000, 12abc)",
     "INSERT INTO cards VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
    ("SELECT E'a\\'b', U&'d\\0061t' UESCAPE '!', B'0101', X'1F', N'nat', U&\"x\"",
     "SELECT $1, $2 UESCAPE $3, $4, $5, $6, U&\"x\""),
    ("SELECT $$dollar$$, $tag$ x $$ y $tag$, $1, $2::int", "SELECT $3, $4, $1, $2::int"),
    ("SELECT a$1, x$y$ FROM t", "SELECT a$1, x$y$ FROM t"),  # names, not parameters
    ("SELECT 1 -- the secret\nFROM t /* a /* nested */ secret */ WHERE x = 'y",
     "SELECT $1 /*...*/ FROM t /*...*/ WHERE x = $2"),
    ('SELECT a.b, t."Col 1" FROM "my ""table""" WHERE x IN (1,2,3)',
     'SELECT a.b, t."Col 1" FROM "my ""table""" WHERE x IN ($1,$2,$3)'),
    ("  SELECT\n\t  1  ,\r\n  x  ", "SELECT $1 , x"),
    ("SELECT 'x'::date, DATE '2020-01-01', -5, x-1, x- -1",
     "SELECT $1::date, DATE $2, -$3, x-$4, x- -$5"),
    ("SELECT 'it''s'  'continued'", "SELECT $1 $2"),
    ("SELECT 'cut short", "SELECT $1"),
    ("SELECT $a$ cut short", "SELECT $1"),
    ("SELECT 1 /* cut short", "SELECT $1 /*...*/"),
    ('SELECT "cut short', 'SELECT "cut short'),
    ("LISTEN chan", "LISTEN chan"),
    ("abc'x'", "abc $1"),  # never "abc$1": that reads as one name
    ("$'x'", "$ $1"),  # never "$$1": that opens a dollar quote
    ("x--1\ny", "x/*...*/ y"),
    ("SELECT 'ünï' || \"ßé\" FROM tàble", "SELECT $1 || \"ßé\" FROM tàble"),
    # A backslash before a quote: each reading of standard_conforming_strings hides its own.
    ("SELECT 'C:\\', 'secret'", "SELECT $1"),
    ("UPDATE users SET pw = 'ab\\'cd' WHERE id = 1", "UPDATE users SET pw = $1"),
    ("SELECT 'a\\\\b', 2", "SELECT $1, $2"),  # an escaped backslash: both readings agree
]


@pytest.mark.parametrize(("query", "redacted"), TABLE)
def test_table(query: str, redacted: str) -> None:
    assert redact(query) == redacted
    assert redact(redacted) == redacted


def test_a_private_use_character_in_the_text_is_kept() -> None:
    # The scanner marks placeholders with a private-use character the text does not hold.
    assert redact("SELECT '\ue000', \ue000x, 1") == "SELECT $1, \ue000x, $2"
    assert redact("SELECT '\ue000\ue001', \ue000\ue001, 1") == "SELECT $1, \ue000\ue001, $2"


def test_a_parameter_too_long_for_an_int_is_no_parameter() -> None:
    digits = "9" * 5000  # int() refuses this many digits; PostgreSQL too
    assert redact(f"SELECT ${digits}, 1, ${digits} x") == f"SELECT ${digits}, $1, ${digits} x"


# -- generated statements -----------------------------------------------------------------

MARKERS = "QJKZ"  # only ever inside literals, comments and passwords
SECRET = st.text(alphabet=MARKERS + "'\"\\$ \n\t-*/;:é", min_size=1, max_size=12).map(
    lambda s: "Q" + s + "Z"
)
NAME = st.text(alphabet="abcdefghilmnoprstuvwy_", min_size=1, max_size=8).filter(
    lambda s: s.upper() not in ("E", "U", "B", "X", "N")  # prefixes of constants
)
PUNCT = st.sampled_from(["(", ")", ",", ";", ".", "::", "=", "+", "-", "*", "/", "<>", "||"])


def _dollar(content: str, tag: str) -> str:
    while f"${tag}$" in f"${content}$":
        tag += "q"
    return f"${tag}${content}${tag}$"


def _standard(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _legacy(s: str) -> str:
    """As written for standard_conforming_strings off (or in E'...'): backslash escapes."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def literals(legacy: bool) -> st.SearchStrategy[str]:
    """Constants and comments hiding a SECRET, written for one reading of backslashes."""
    plain = _legacy if legacy else _standard
    return st.one_of(
        SECRET.map(plain),
        SECRET.map(lambda s: "N" + plain(s)),
        SECRET.map(lambda s: "E" + _legacy(s)),
        SECRET.map(lambda s: "U&" + _standard(s)),
        SECRET.map(lambda s: "X" + _standard(s)),
        st.tuples(SECRET, st.sampled_from(["", "t", "tag_a", "é"])).map(lambda a: _dollar(*a)),
        SECRET.map(lambda s: "-- " + s.replace("\n", " ").replace("\r", " ") + "\n"),
        SECRET.map(lambda s: "/* " + s.replace("*/", "").replace("/*", "") + " */"),
        # A password given as a name (a typo the server rejects, but pg_stat_activity shows).
        SECRET.map(lambda s: "; ALTER ROLE r PASSWORD " + re.sub(r"[^A-Za-z]", "", s)),
        SECRET.map(lambda s: '; CREATE USER r PASSWORD "' + s.replace('"', '""') + '"'),
    )


NUMBER = st.integers(min_value=100_000, max_value=10**17).map(str) | st.sampled_from(
    ["123456.75", "98765e12", ".123456", "0x4111AB", "1_000_000"]
)
OTHER_TOKENS = st.one_of(
    NAME, NAME.map(lambda s: f'"{s} {s}"'), PUNCT, NUMBER,
    st.integers(min_value=1, max_value=99).map(lambda i: f"${i}"),
    st.sampled_from(["SELECT", "FROM", "WHERE", "password", "NULL"]),
)
TOKENS = {legacy: st.one_of(OTHER_TOKENS, literals(legacy)) for legacy in (False, True)}
INLINE = (" ", "  ", "\t", "\f", " \t ")
LINES = ("\n", " \r\n\t ", "\n\n", "\r")  # a line break ends a -- comment: not interchangeable
WHITESPACE = st.sampled_from(INLINE + LINES)


def statement(tokens: list[str], spaces: list[str]) -> str:
    return "".join(t + s for t, s in zip(tokens, spaces, strict=False))


Generated = tuple[list[str], list[str], str]  # tokens, the whitespace after each, the text


@st.composite
def statements(draw: st.DrawFn) -> Generated:
    # One statement is written for one reading: standard_conforming_strings on or off.
    tokens = draw(st.lists(TOKENS[draw(st.booleans())], min_size=1, max_size=25))
    if draw(st.booleans()):
        tokens[:0] = ["ALTER", "ROLE", draw(NAME)]
    spaces = draw(st.lists(WHITESPACE, min_size=len(tokens), max_size=len(tokens)))
    return tokens, spaces, statement(tokens, spaces)


def leaked(text: str) -> str | None:
    """A marker or a digit (other than a placeholder's or parameter's) left in ``text``."""
    rest = re.sub(r"\$[0-9]+", "", text)
    found = re.search(f"[{MARKERS}0-9]", rest)
    return found.group() if found else None


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(statements(), st.data())
def test_no_literal_survives_even_cut_short(generated: Generated, data: st.DataObject) -> None:
    query = generated[2]
    out = redact(query)
    assert leaked(out) is None, (query, out)
    cut = query[: data.draw(st.integers(min_value=0, max_value=len(query)))]
    out = redact(cut)
    assert leaked(out) is None, (cut, out)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(statements(), st.data())
def test_whitespace_between_tokens_does_not_change_the_shape(
    generated: Generated, data: st.DataObject
) -> None:
    tokens, spaces, query = generated
    # Where the two readings of backslashes split the text differently, a space may be
    # inside a name in one and between tokens in the other: nothing is stable there.
    assume(not re.search(r"(?<!\\)(?:\\\\)*+\\'", query))
    others = [data.draw(st.sampled_from(LINES if s in LINES else INLINE)) for s in spaces]
    assert redact(statement(tokens, others)) == redact(query)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(statements())
def test_idempotent_on_statements(generated: Generated) -> None:
    once = redact(generated[2])
    assert redact(once) == once


PIECES = st.sampled_from(
    [*"abE'\"\\$-/*;:., \n\t019eUu&xXbBnN()=é\x00\x85\u2028\ue000",
     "--", "/*", "*/", "$$", "$a$", "E'", "U&'", "''", "password", "ALTER ROLE x ", "NULL"]
)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(PIECES, max_size=40).map("".join) | st.text(max_size=60))
def test_idempotent_and_total_on_any_text(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
    assert redact(text) == once  # deterministic


# -- hostile sizes ----------------------------------------------------------------------

MB = 1_000_000
HOSTILE = {
    "numbers": "1," * (MB // 2),
    "strings": "'',x" * (MB // 4),
    "open parens": "(" * MB,
    "quotes": "'" * MB,
    "nested comments": "/*" * (MB // 2),
    "comment ends": "*/" * (MB // 2),
    "dollar tags": "$a$" * (MB // 3),
    "backslash quotes": "'\\'" * (MB // 3),
    "backslashes": "\\" * MB,
    "line comments": "--\n" * (MB // 3),
    "escape strings": "E'\\" * (MB // 3),
    "glued literals": "x'" * (MB // 2),
    "mixed readings": "a'b'\\" * (MB // 5),
    "passwords": "ALTER ROLE x" + " PASSWORD" * (MB // 9),
    "comment before a role statement": "/*" + "x" * (MB // 2) + "*/ALTER ROLE x"
                                       + " PASSWORD" * (MB // 18),
    "one name": "a" * MB,
    "quoted name quotes": '"' * MB,
    "lines": "a\n" * (MB // 2),
}


# Linear: about a second per megabyte on a busy machine. A quadratic step would need hours.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_megabyte_of_hostile_text_is_linear(name: str) -> None:
    text = HOSTILE[name]
    once = redact(text)
    assert redact(once) == once
    assert leaked(once) is None or name in ("one name", "lines", "quoted name quotes")
