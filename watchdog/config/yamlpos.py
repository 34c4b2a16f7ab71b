"""YAML loading that keeps every node's file position, with ${VAR} expansion.

The policy file decides which production sessions get killed, so every error
must point at the exact spot: this module turns PyYAML's node graph into
:class:`YNode` trees that remember line, column and key path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(Exception):
    """A problem in the policy file, rendered as ``FILE:LINE:COL: key.path: message``."""

    def __init__(self, file: str, line: int, col: int, path: str, message: str) -> None:
        self.file, self.line, self.col, self.path, self.message = file, line, col, path, message
        where = f"{file}:{line}:{col}: "
        super().__init__(where + (f"{path}: {message}" if path else message))


@dataclass(frozen=True)
class YNode:
    """A YAML value with its position: ``value`` is a dict, a list or a plain scalar."""

    value: Any
    file: str
    line: int
    col: int
    path: str
    # Positions of mapping keys, so an unknown key is reported where it is written.
    key_marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Column of a scalar's first character when its characters sit 1:1 on one source line
    # (no escapes, folding or ${VAR}), so an error can point inside the value; else None.
    text_col: int | None = None

    def error(self, message: str, key: str | None = None) -> ConfigError:
        """A ConfigError at this node (or at one of its keys)."""
        if key is not None:
            line, col = self.key_marks.get(key, (self.line, self.col))
            return ConfigError(self.file, line, col, join_path(self.path, key), message)
        return ConfigError(self.file, self.line, self.col, self.path, message)


def join_path(base: str, key: str | int) -> str:
    """The key path of a child: ``policies[1].longer_than``."""
    if isinstance(key, int):
        return f"{base}[{key}]"
    if not key.isprintable() or key != key.strip() or not key:
        # A newline, escape sequence, invisible or blank space in a key: show it, one line.
        return f"{base}[{key!r}]"
    return f"{base}.{key}" if base else key


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; KeyError names a variable that is unset."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise KeyError(name)
        return value

    return _VAR.sub(repl, text)


# A policy file is a few hundred nodes (a thousand targets: about 7,000). Aliases are expanded
# into copies, so a few hundred bytes of nested aliases can ask for millions: the count
# includes every copy. At this cap building takes about a second and a few tens of MB.
MAX_NODES = 50_000
# Bounds what the scanner reads before any node is counted (comments, long strings).
MAX_BYTES = 1024 * 1024


def _where(mark: Any) -> tuple[int, int]:
    """1-based line and column of a PyYAML mark (1:1 when it has none)."""
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


class _Alias(yaml.Node):
    """An alias where it is written (its own position), and the anchored node it names."""

    def __init__(self, node: yaml.Node, mark: Any) -> None:
        super().__init__(node.tag, node.value, mark, mark)
        self.node = node
        self.at = _where(mark)


class _TooMany(Exception):
    def __init__(self, at: tuple[int, int]) -> None:
        self.at = at


class _Loader(yaml.SafeLoader):
    """SafeLoader's composer that counts nodes and keeps the position of each alias."""

    composed = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            assert node is not None
            return _Alias(node, event.start_mark)
        self.composed += 1
        if self.composed > MAX_NODES:
            raise _TooMany(_where(event.start_mark))
        return super().compose_node(parent, index)


def _compose(text: str) -> yaml.Node | None:
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.loader = yaml.SafeLoader("")
        # Collections being built, by id, with their key path: an alias to one of them recurses.
        self.open: dict[int, str] = {}
        self.built = 0
        # Aliases being expanded, outermost first: (line, col, key path) where each is written.
        self.aliases: list[tuple[int, int, str]] = []

    def build(self, node: yaml.Node, path: str) -> YNode:
        if isinstance(node, _Alias):
            self.aliases.append((*node.at, path))
            try:
                return self.build(node.node, path)
            finally:
                self.aliases.pop()
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        self.built += 1
        if self.built > MAX_NODES:
            raise self.too_many(line, col, path)
        if id(node) in self.open:
            raise ConfigError(
                self.file,
                line,
                col,
                self.open[id(node)],
                "invalid YAML: recursive alias (this node contains an alias to itself)",
            )
        if isinstance(node, yaml.ScalarNode):
            value = self.scalar(node, line, col, path)
            return YNode(value, self.file, line, col, path, text_col=_text_col(node, col))
        self.open[id(node)] = path
        try:
            return self.collection(node, path, line, col)
        finally:
            del self.open[id(node)]

    def collection(self, node: yaml.Node, path: str, line: int, col: int) -> YNode:
        if isinstance(node, yaml.MappingNode):
            values: dict[str, YNode] = {}
            marks: dict[str, tuple[int, int]] = {}
            for key_node, value_node in node.value:
                kline, kcol = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(self.file, kline, kcol, path, "keys must be plain names")
                key = str(key_node.value)
                if key in values:
                    raise ConfigError(self.file, kline, kcol, join_path(path, key), "duplicate key")
                marks[key] = (kline, kcol)
                values[key] = self.build(value_node, join_path(path, key))
            return YNode(values, self.file, line, col, path, marks)
        if isinstance(node, yaml.SequenceNode):
            items = [self.build(item, join_path(path, i)) for i, item in enumerate(node.value)]
            return YNode(items, self.file, line, col, path)
        raise AssertionError(f"unexpected YAML node {node!r}")

    def too_many(self, line: int, col: int, path: str) -> ConfigError:
        if not self.aliases:
            return ConfigError(self.file, line, col, path, _too_many(""))
        # The outermost alias being expanded: written where the file asks for all the copies.
        line, col, path = self.aliases[0]
        message = _too_many("at this alias, aliases expand to ")
        return ConfigError(self.file, line, col, path, message)

    def scalar(self, node: yaml.ScalarNode, line: int, col: int, path: str) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise ConfigError(self.file, line, col, path, _yaml_problem(exc)) from None
        except (ValueError, TypeError, OverflowError, LookupError) as exc:
            # e.g. `2024-13-45` resolves as a timestamp, `!!int abc`, `!!int ""` (IndexError),
            # `!!bool ""` (KeyError): PyYAML lets these escape.
            raise ConfigError(
                self.file,
                line,
                col,
                path,
                f"invalid YAML: cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {exc}"
                " (quote it if it is text)",
            ) from None
        if not isinstance(value, str) or "${" not in value:
            return value
        try:
            expanded = expand_env(value, self.environ)
        except KeyError as exc:
            raise ConfigError(
                self.file,
                line,
                col,
                path,
                f"environment variable {exc.args[0]} is not set "
                f"(set it, or write ${{{exc.args[0]}:-default}})",
            ) from None
        if node.style is None:
            # An unquoted ${VAR} takes the type its value reads as: `dry_run: ${DRY:-false}`.
            tag = self.loader.resolve(yaml.ScalarNode, expanded, (True, False))  # type: ignore[no-untyped-call]
            if tag != "tag:yaml.org,2002:str":
                resolved = yaml.ScalarNode(tag, expanded, node.start_mark, node.end_mark)
                try:
                    return self.loader.construct_object(resolved, deep=True)
                except (yaml.YAMLError, ValueError, TypeError, OverflowError, LookupError):
                    return expanded
        return expanded


def _text_col(node: yaml.ScalarNode, col: int) -> int | None:
    start, end, text = node.start_mark, node.end_mark, str(node.value)
    if start.line != end.line or "${" in text:
        return None
    width = end.column - start.column
    if node.style is None and width == len(text):
        return col
    if node.style in ("'", '"') and width == len(text) + 2:
        return col + 1
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context else str(problem)
    start, at = getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)
    if context and context.startswith("while") and start and at and start.line != at.line:
        # An unclosed bracket or quote is reported where the parser gave up: say where it opened.
        text += f" (started at line {start.line + 1}, column {start.column + 1})"
    if "'\\t'" in text:
        text += " (indent with spaces, not tabs)"
    return f"invalid YAML: {text}"


MAX_DEPTH = 100


def _too_many(what: str) -> str:
    return f"invalid YAML: {what}more than {MAX_NODES} nodes (a policy file has a few hundred)"


def _too_deep(text: str, file: str) -> ConfigError:
    """The error for a document nested past Python's recursion limit, at the first node too deep.

    PyYAML's composer recurses once per level; its parser does not, so the events show where.
    """
    depth = 0
    line, col = 1, 1
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                mark = event.start_mark
                if depth > MAX_DEPTH and mark is not None:
                    line, col = mark.line + 1, mark.column + 1
                    break
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except (yaml.YAMLError, RecursionError):
        pass
    return ConfigError(
        file, line, col, "", f"invalid YAML: nested more than {MAX_DEPTH} levels deep"
    )


def load_yaml(text: str, file: str, environ: Mapping[str, str] | None = None) -> YNode:
    """Parse one YAML document into a :class:`YNode` tree; ConfigError on any problem."""
    env = os.environ if environ is None else environ
    try:
        node = _compose(text)
    except _TooMany as exc:
        raise ConfigError(file, *exc.at, "", _too_many("")) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError(file, line, col, "", _yaml_problem(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, 1, 1, "", _yaml_problem(exc)) from None
    except RecursionError:
        raise _too_deep(text, file) from None
    if node is None:
        raise ConfigError(file, 1, 1, "", "the file is empty")
    try:
        return _Builder(file, env).build(node, "")
    except RecursionError:
        raise _too_deep(text, file) from None
