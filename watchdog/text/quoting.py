"""SQL printed for people to paste: identifiers and literals quoted as PostgreSQL quotes them.

``quote_ident`` is ruleutils.c's quote_identifier(): a name stays bare only when it is lower
case ASCII letters, digits and underscores, starts with a letter or underscore, and is not a
keyword that needs quoting. Which keywords need it changes between majors, so callers pass the
set the server itself reports (``queries.KEYWORDS``: pg_get_keywords() with catcode <> 'U').
``quote_literal`` is quote_literal(): quotes doubled, and backslashes doubled under an E prefix.
"""

from __future__ import annotations

import re
from collections.abc import Collection

# ASCII only: a byte >= 0x80 makes PostgreSQL quote the name.
_BARE = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)


def quote_ident(name: str, keywords: Collection[str]) -> str:
    """``name`` as quote_ident() returns it on a server whose quoted keywords are ``keywords``."""
    if _BARE.fullmatch(name) and name not in keywords:
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as quote_literal() returns it: a string constant any setting reads the same."""
    body = "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "E" + body if "\\" in text else body
