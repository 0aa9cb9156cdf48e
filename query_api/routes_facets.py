"""GET /facets: the stored values of a metadata key, so people choose a filter instead of
guessing its exact spelling (the page's filter list)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query

from query_api.errors import ApiError, error_responses
from query_api.params import parse_filter_value
from query_api.routes_common import Service
from query_api.schemas import FacetsResponse, FacetValue
from shared.metadata import METADATA_KEY_PATTERN
from shared.store.base import FACET_KEYS, FACET_LIMIT, FacetUnavailableError, FilterValue

MAX_FACET_LIMIT = 1000


def filter_text(key: str, value: FilterValue) -> str:
    """``key=value`` that /search's ``filter`` parses back to exactly ``value``."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if not isinstance(value, str):
        return f"{key}={value}"
    # Text that would read as a boolean, a number or a quoted string is quoted.
    return f"{key}={value}" if parse_filter_value(value) == value else f'{key}="{value}"'


def build_facets_router(service: Service, protected: list[Any],
                        auth_errors: tuple[int, ...]) -> APIRouter:
    store = service.engine.store
    router = APIRouter()

    @router.get(
        "/facets", response_model=FacetsResponse, tags=["images"], dependencies=protected,
        summary="The stored values of a metadata key, with how many images have each",
        description=(
            f"Offered for the keys the collection indexes for it: {', '.join(FACET_KEYS)}. "
            "Each value comes with the exact `filter` to pass to /search or /similar. "
            "Another key answers 422 `facet_unavailable`."
        ),
        responses=error_responses(*auth_errors, 422, 503),
    )
    async def facets(
        key: Annotated[str, Query(pattern=METADATA_KEY_PATTERN,
                                  description="Metadata key, e.g. label.")] = "label",
        limit: Annotated[int, Query(ge=1, le=MAX_FACET_LIMIT,
                                    description="Most values returned.")] = FACET_LIMIT,
    ) -> FacetsResponse:
        try:
            counts = await anyio.to_thread.run_sync(partial(store.facets, key, limit=limit))
        except FacetUnavailableError as exc:
            raise ApiError(422, "facet_unavailable", str(exc)) from exc
        return FacetsResponse(key=key, values=[
            FacetValue(value=c.value, count=c.count, filter=filter_text(key, c.value))
            for c in counts
        ])

    return router
