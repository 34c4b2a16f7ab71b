"""escape.json_text's shortcut for pure-ASCII lines gives exactly the escaped JSON it replaces."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.text.escape import _JSON_UNSAFE, _json_escape, json_line, json_text

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.sampled_from(["\x7f", "a\x85b", "\u2028", "\u202e", "\ud800", "plain ascii", "é"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)


@settings(max_examples=2000)
@given(VALUES)
def test_one_line_json_is_the_escaped_dump(value: object) -> None:
    want = _JSON_UNSAFE.sub(_json_escape, json.dumps(value, ensure_ascii=False))
    assert json_line(value) == json_text(value) == want
    assert json.loads(json_line(value)) == value or value != value


def test_del_is_escaped_though_it_is_ascii() -> None:
    assert json_line({"q": "a\x7fb"}) == '{"q": "a\\u007fb"}'
