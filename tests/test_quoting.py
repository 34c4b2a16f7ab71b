"""watchdog.text.quoting against the server's own quote_ident() and quote_literal(), every major.

The keyword set comes from the server (queries.KEYWORDS), as advise and check read it; every
keyword the major knows, and names that trip simpler rules, must come out byte for byte as the
server quotes them.
"""

from __future__ import annotations

from helpers import connect

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.pg import queries
from watchdog.text.quoting import quote_ident, quote_literal

NAMES = [
    "all", "current_user", "session_user", "user", "User", "with space", '"quoted"', "a$b",
    "_x", "x1", "1x", "é", "leaky", "app", "watchdog", "select", "table", "name", "a-b", "",
    'x"', "ALL", "pg_monitor", "with\nnewline", "tab\there", "🐘",
]
LITERALS = ["plain", "it's", "back\\slash", "both \\ and '", "", "\n", "''\\\\", "é🐘"]


async def test_quote_ident_matches_the_server_for_every_keyword_and_odd_name(
    pg: TempCluster,
) -> None:
    conn = await connect(pg)
    try:
        keywords = frozenset(await conn.fetchval(queries.KEYWORDS))
        words = [r["word"] for r in await conn.fetch("SELECT word FROM pg_get_keywords()")]
        assert {"all", "current_user", "table"} <= keywords and "name" not in keywords
        names = [*words, *NAMES]
        server = await conn.fetchval("SELECT array_agg(quote_ident(n) ORDER BY i)"
                                     " FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i)", names)
        ours = [quote_ident(n, keywords) for n in names]
        assert [(n, o) for n, o, s in zip(names, ours, server, strict=True) if o != s] == []
    finally:
        await conn.close()


async def test_quote_literal_matches_the_server(pg: TempCluster) -> None:
    conn = await connect(pg)
    try:
        server = await conn.fetchval("SELECT array_agg(quote_literal(n) ORDER BY i)"
                                     " FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i)",
                                     LITERALS)
        assert [quote_literal(t) for t in LITERALS] == server
        for text, quoted in zip(LITERALS, server, strict=True):  # and reads back as written
            assert await conn.fetchval(f"SELECT {quoted}::text") == text
    finally:
        await conn.close()
