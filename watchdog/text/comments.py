"""SQL block comments: where one ends. They nest, as PostgreSQL's lexer nests them."""

from __future__ import annotations


def block_end(text: str, start: int) -> int:
    """Index just past the block comment opening at ``start``, or -1 if it never closes."""
    depth, i = 0, start
    opening, closing = start, text.find("*/", start + 2)
    while closing >= 0:
        if 0 <= opening < closing:
            depth, i = depth + 1, opening + 2
        else:
            depth, i = depth - 1, closing + 2
            if depth == 0:
                return i
        # Each search resumes where the last stopped: linear in the text's length.
        if 0 <= opening < i:
            opening = text.find("/*", i)
        if closing < i:
            closing = text.find("*/", i)
    return -1
