"""JSON from untrusted bytes, bounded in size and depth, failing only with ``JSONError``.

Python's ``json`` accepts things no other JSON reader does and fails in ways callers do
not expect: ``NaN`` and ``Infinity`` (a store cannot keep them), ``1e400`` (infinity),
``\\ud800`` (a lone surrogate: no UTF-8 encoder can write it back) and ``RecursionError``
on ``[[[[...`` a hundred thousand deep. Here each of those is a ``JSONError`` whose
message says what is wrong, and the nesting is measured before anything is parsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Strings (with their escapes) are skipped whole, so brackets inside them do not count.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|[\]}]')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONError(ValueError):
    """The bytes are not JSON this project accepts; the message says why."""


def _depth(data: bytes, limit: int) -> None:
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise JSONError(f"nested deeper than {limit} levels (at byte {match.start()})")
        elif token in (b"]", b"}"):
            depth -= 1


def _reject_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONError(f"number {text[:40]} is too large for a 64-bit float")
    return value


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates anywhere (keys included); iterative, the depth is bounded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise JSONError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(data: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse ``data`` as strict JSON (UTF-8, RFC 8259 numbers only)."""
    if len(data) > max_bytes:
        raise JSONError(f"is {len(data):,} bytes; at most {max_bytes:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONError(f"not UTF-8: {exc}") from exc
    _depth(data, max_depth)
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise JSONError(str(exc)) from exc
    except RecursionError as exc:  # cannot happen after _depth; kept as a last guard
        raise JSONError("nested too deeply") from exc
    if _SURROGATE_ESCAPE.search(data):
        _check_strings(value)
    return value
