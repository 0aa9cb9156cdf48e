"""What an image may carry besides its pixels: its id and its metadata.

Events (shared/events.py) and the HTTP API (POST /images) check both with these same
rules, at the boundary, so nothing reaches the store that it cannot hold or give back:

* ``image_id``: 1 to 512 characters, none of them a control character, a line or
  paragraph separator, or a lone surrogate (it could never be read back by URL);
* metadata: a flat object of at most 64 keys, each matching ``METADATA_KEY_PATTERN``;
  values are strings (at most 2,048 characters, no control characters other than tab
  and newlines), booleans, integers within int64, or finite floats; no lists or objects;
  at most 16 KiB as JSON.

A broken rule raises ``InvalidValue``, whose message names the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MetadataValue = str | bool | int | float
Metadata = dict[str, MetadataValue]

MAX_IMAGE_ID = 512
# Keys become payload paths (``metadata.<key>``) and query parameters, so keep them plain.
METADATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$"
MAX_METADATA_KEYS = 64
MAX_METADATA_STRING = 2048
MAX_METADATA_BYTES = 16 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_KEY = re.compile(METADATA_KEY_PATTERN)
# Ids end up in URLs, logs and Kafka keys: no control characters of any kind.
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Free text may hold tabs and line breaks, nothing else invisible; lone surrogates
# cannot be encoded as UTF-8, so no store could keep them.
_BAD_TEXT_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class InvalidValue(ValueError):
    """A value breaks the rules above; ``field`` says which one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _describe_char(text: str, match: re.Match[str]) -> str:
    return f"U+{ord(match.group()):04X} at position {match.start()}"


def check_text(value: str, field: str, *, max_length: int, single_line: bool = False) -> str:
    """Return ``value`` if it is at most ``max_length`` characters of storable text."""
    if len(value) > max_length:
        raise InvalidValue(field, f"is {len(value):,} characters long; at most {max_length:,}")
    bad = (_BAD_ID_CHARS if single_line else _BAD_TEXT_CHARS).search(value)
    if bad is not None:
        raise InvalidValue(field, f"contains the control character {_describe_char(value, bad)}")
    return value


def check_image_id(image_id: Any, field: str = "image_id") -> str:
    if not isinstance(image_id, str):
        raise InvalidValue(field, f"must be a string, not {type(image_id).__name__}")
    if not image_id.strip():
        raise InvalidValue(field, "must not be empty or blank")
    return check_text(image_id, field, max_length=MAX_IMAGE_ID, single_line=True)


def _check_value(key: str, value: Any, field: str) -> MetadataValue:
    where = f"{field}.{key}"
    # bool before int: True is an int to Python, and stays a boolean here.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidValue(where, f"integer {value} is outside int64 (what the store keeps)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(where, f"must be a finite number, not {value}")
        return value
    if isinstance(value, str):
        return check_text(value, where, max_length=MAX_METADATA_STRING)
    kind = {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)
    raise InvalidValue(where, f"is {kind}; values must be strings, numbers or booleans (no nesting)")


def check_metadata(metadata: Any, field: str = "metadata") -> Metadata:
    """Return ``metadata`` as a plain dict if it follows every rule; else InvalidValue."""
    if not isinstance(metadata, dict):
        raise InvalidValue(field, 'must be a JSON object, e.g. {"label": "goldfinch"}')
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidValue(field, f"has {len(metadata)} keys; at most {MAX_METADATA_KEYS}")
    checked: Metadata = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY.match(key):
            shown = key[:80] if isinstance(key, str) else key
            raise InvalidValue(
                field, f"key {shown!r} must match {METADATA_KEY_PATTERN} "
                "(letters, digits, '_' and '-', starting with a letter or '_')")
        checked[key] = _check_value(key, value, field)
    size = len(json.dumps(checked, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidValue(field, f"is {size:,} bytes as JSON; at most {MAX_METADATA_BYTES:,}")
    return checked


def parse_metadata_json(raw: str | None, field: str = "metadata") -> Metadata:
    """Metadata sent as JSON text (the API's form field); empty means none."""
    from shared.strictjson import JSONError, loads

    if raw is None or not raw.strip():
        return {}
    try:
        value = loads(raw.encode("utf-8", "surrogatepass"), max_bytes=MAX_METADATA_BYTES * 2,
                      max_depth=2)
    except JSONError as exc:
        raise InvalidValue(field, f"is not valid JSON: {exc}") from exc
    return check_metadata(value, field)
