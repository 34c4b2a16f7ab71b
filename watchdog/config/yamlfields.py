"""Readers that turn positioned YAML nodes into checked values, or a ConfigError at the node."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, TypeVar

from watchdog.config.units import parse_duration, parse_percent
from watchdog.config.yamlpos import YNode

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_DURATION = 3650 * 86400.0  # ten years


def mapping(
    node: YNode, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> dict[str, YNode]:
    if not isinstance(node.value, dict):
        raise node.error(f"must be a mapping, not {kind(node.value)}")
    fields: dict[str, YNode] = node.value
    for key in fields:
        if key not in allowed:
            raise node.error(f"unknown key (expected one of: {', '.join(allowed)})", key)
    for key in required:
        if key not in fields:
            raise node.error(f"missing required key '{key}'")
    return fields


def kind(value: Any) -> str:
    if value is None:
        return "empty"
    names = {
        dict: "a mapping",
        list: "a list",
        bool: "a boolean",
        str: "a string",
        int: "a number",
        float: "a number",
        date: "a date",
        datetime: "a date",
        bytes: "binary data",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def opt(fields: dict[str, YNode], key: str, read: Callable[[YNode], T], default: T) -> T:
    return read(fields[key]) if key in fields else default


def boolean(node: YNode) -> bool:
    if not isinstance(node.value, bool):
        shown = "" if node.value is None else f" {node.value!r}"
        raise node.error(f"must be true or false, not {kind(node.value)}{shown}")
    return node.value


def string(node: YNode) -> str:
    if not isinstance(node.value, str):
        raise node.error(f"must be a string, not {kind(node.value)}")
    return node.value


def ident(node: YNode) -> str:
    value = string(node)
    if not _NAME.fullmatch(value):
        raise node.error(f"{value!r} is not a valid name (letters, digits, '_', '.', '-')")
    return value


def duration(node: YNode) -> float:
    if isinstance(node.value, bool) or not isinstance(node.value, str | int | float):
        raise node.error(f"must be a duration (e.g. 30s, 10m, 1h30m), not {kind(node.value)}")
    if not isinstance(node.value, str):
        raise node.error(f"{node.value!r} has no unit (e.g. 30s, 10m, 1h30m)")
    try:
        seconds = parse_duration(node.value)
    except ValueError as exc:
        raise node.error(str(exc)) from None
    if seconds <= 0:
        raise node.error(f"{node.value!r} must be greater than zero")
    if not seconds <= MAX_DURATION:  # also catches inf: "999...9d" overflows the float
        # Schedulers and datetimes overflow long before: nothing useful waits that long.
        raise node.error(f"{node.value!r} is too long (at most {MAX_DURATION // 86400:.0f}d)")
    return seconds


def percent(node: YNode) -> float:
    if not isinstance(node.value, str):
        raise node.error(f"must be a percentage such as 80%, not {kind(node.value)}")
    try:
        return parse_percent(node.value)
    except ValueError as exc:
        raise node.error(str(exc)) from None


def choice(options: tuple[str, ...]) -> Callable[[YNode], str]:
    def read(node: YNode) -> str:
        value = string(node)
        if value not in options:
            raise node.error(f"unknown value {value!r} (expected one of: {', '.join(options)})")
        return value

    return read


def list_of(node: YNode, item: Callable[[YNode], T], allow_scalar: bool = True) -> tuple[T, ...]:
    """A list of items; a single scalar stands for a list of one where ``allow_scalar``."""
    if isinstance(node.value, list):
        return tuple(item(n) for n in node.value)
    if allow_scalar and node.value is not None and not isinstance(node.value, dict):
        return (item(node),)
    raise node.error(f"must be a list, not {kind(node.value)}")


def str_list(node: YNode) -> tuple[str, ...]:
    return list_of(node, string)


def cidr(node: YNode) -> Network:
    value = string(node)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean {ipaddress.ip_network(value, strict=False)}?)"
        raise node.error(f"{value!r} is not a valid CIDR: {exc}{hint}") from None


def cidr_list(node: YNode) -> tuple[Network, ...]:
    return list_of(node, cidr)
