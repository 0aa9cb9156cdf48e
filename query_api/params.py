"""Query parameters shared by /search and /images/{image_id}/similar."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Query
from pydantic import StringConstraints

from query_api.errors import ApiError
from shared.config import Settings
from shared.metadata import INT64_MAX, INT64_MIN, METADATA_KEY_PATTERN

MAX_FILTERS = 16
_INT = re.compile(r"^-?\d{1,19}$")
_FLOAT = re.compile(r"^-?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d{1,3})?$")
# key=value, the key as metadata keys are (shared/events.py); documented in the OpenAPI spec.
# Only the start is anchored: the value may be any text, newlines included.
FILTER_PATTERN = METADATA_KEY_PATTERN.removesuffix("$") + "="
FilterItem = Annotated[str, StringConstraints(pattern=FILTER_PATTERN)]

FILTER_HELP = (
    "Metadata filter `key=value`, repeatable; several filters are ANDed. "
    "`true`/`false` match booleans; numbers (`3`, `89.5`, `-1e3`) match numbers, so `3` "
    "finds 3 and 3.0; anything else, or a value in double quotes (`zip=\"02139\"`), matches "
    "text exactly. Example: `filter=label=goldfinch`."
)


@dataclass(frozen=True)
class SearchParams:
    limit: int = 10
    offset: int = 0
    score_threshold: float | None = None
    filters: dict[str, Any] = field(default_factory=dict)
    with_metadata: bool = True
    # Two filters on one key with different values: ANDed, nothing can match.
    contradictory: bool = False


def parse_filter_value(raw: str) -> str | int | float | bool:
    if raw in ("true", "false"):
        return raw == "true"
    if _INT.match(raw) and INT64_MIN <= int(raw) <= INT64_MAX:
        return int(raw)
    if _FLOAT.match(raw) and math.isfinite(float(raw)):
        return float(raw)
    if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
        return raw[1:-1]
    return raw


def parse_filters(items: list[str]) -> tuple[dict[str, Any], bool]:
    """The filters, and whether they contradict each other (same key, other value)."""
    filters: dict[str, Any] = {}
    contradictory = False
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ApiError(
                422, "invalid_filter", f"filter {item!r} must be key=value (e.g. label=goldfinch)"
            )
        if not re.match(METADATA_KEY_PATTERN, key):
            raise ApiError(
                422, "invalid_filter",
                f"filter key {key!r} must match {METADATA_KEY_PATTERN} "
                "(letters, digits, '_' and '-', starting with a letter or '_')",
            )
        value = parse_filter_value(raw)
        if key in filters and filters[key] != value:
            contradictory = True
        filters[key] = value
    return filters, contradictory


def search_params_dependency(settings: Settings) -> Callable[..., SearchParams]:
    """Build the dependency with this deployment's limits, so /docs shows the real caps."""

    # Defaults rather than Annotated[...]: with postponed annotations FastAPI could not
    # resolve ``settings`` (a closure variable) inside the annotation.
    def search_params(
        limit: int = Query(10, ge=1, le=settings.api_max_limit, description="Hits per page."),
        offset: int = Query(
            0, ge=0, le=settings.api_max_offset, description="Hits to skip (paging)."
        ),
        score_threshold: float | None = Query(
            None, ge=-1.0, le=1.0, allow_inf_nan=False,
            description="Only hits with at least this cosine similarity.",
        ),
        filter: list[FilterItem] = Query(  # noqa: A002 - the public parameter name
            [], max_length=MAX_FILTERS, description=FILTER_HELP
        ),
        with_metadata: bool = Query(True, description="Include each hit's metadata."),
    ) -> SearchParams:
        filters, contradictory = parse_filters(filter)
        return SearchParams(limit, offset, score_threshold, filters, with_metadata, contradictory)

    return search_params
