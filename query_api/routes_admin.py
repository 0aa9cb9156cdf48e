"""/admin/reindex: a migration's operations over HTTP (REINDEX_ADMIN_API=true).

``imgsearch reindex ...`` uses them beside a running ``imgsearch up`` (whose embedded store
no other process may open); with a Qdrant server, the CLI works on the store directly and
these are a convenience. ``start`` needs a process that can run the backfill: ``up`` can;
a plain API replica answers 409 and says to run ``imgsearch reindex start``.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter
from pydantic import BaseModel, Field

from query_api.errors import ApiError, error_responses
from query_api.serving import Serving
from shared.errors import ConfigError, ImgSearchError
from shared.reindex.controller import Reindex, ReindexError
from shared.reindex.spec import spec_overrides


class StartRequest(BaseModel):
    model: str | None = Field(None, description="timm model name of the new spec.")
    weights: str | None = Field(None, description="Weights file (a path on the server).")
    random_weights: bool = Field(False, description="Random weights (speed tests only).")
    variant: str | None = Field(None, description="full, random:N, pca:N, int8, binary, "
                                                  "or e.g. pca:320+int8.")
    reduction_file: str | None = Field(None, description="A fitted PCA (VECTOR_REDUCTION_FILE).")
    swap: bool = Field(True, description="Swap as soon as the gate passes.")


class SwapRequest(BaseModel):
    allow_missing: bool = Field(False, description="Swap even though images whose source "
                                                   "is gone could not be re-embedded.")


def build_admin_router(serving: Serving, protected: list[Any],
                       auth_errors: tuple[int, ...]) -> APIRouter:
    router = APIRouter(prefix="/admin/reindex", tags=["re-index"], dependencies=protected)
    errors = error_responses(*auth_errors, 409, 422)

    def reindex() -> Reindex:
        return Reindex(serving.specs)

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except ReindexError as exc:
            raise ApiError(409, "reindex_conflict", str(exc)) from exc
        except ConfigError as exc:
            raise ApiError(422, "invalid_spec", str(exc)) from exc
        except ImgSearchError as exc:
            raise ApiError(503, exc.reason, str(exc)) from exc

    def status() -> dict[str, Any]:
        body = reindex().status().as_dict()
        runner = serving.runner
        body["backfill_here"] = bool(runner is not None and runner.running)
        return body

    @router.get("", summary="The index's serving spec and its migration, if any",
                responses=errors)
    async def get_status() -> dict[str, Any]:
        return await call(status)  # type: ignore[no-any-return]

    @router.post("/start", status_code=202, responses=errors,
                 summary="Start (or resume) a migration to another spec, in the background")
    async def start(request: StartRequest) -> dict[str, Any]:
        runner = serving.runner
        if runner is None:
            raise ApiError(409, "backfill_elsewhere",
                           "this API process does not run backfills: run `imgsearch reindex "
                           "start` where the store is reachable (docs/migration.md)")
        from pathlib import Path

        try:
            target = spec_overrides(
                model=request.model, weights=Path(request.weights) if request.weights else None,
                random_weights=request.random_weights, variant=request.variant,
                reduction_file=Path(request.reduction_file) if request.reduction_file else None)
        except ConfigError as exc:
            raise ApiError(422, "invalid_spec", str(exc)) from exc
        runner.swap = request.swap
        await call(runner.start, target or None)
        return await call(status)  # type: ignore[no-any-return]

    @router.post("/stop", responses=errors, summary="Stop this process's backfill "
                 "(its checkpoint is kept; start resumes it)")
    async def stop() -> dict[str, Any]:
        if serving.runner is None or not serving.runner.running:
            raise ApiError(409, "reindex_conflict", "no backfill runs in this process")
        await call(serving.runner.stop)
        return await call(status)  # type: ignore[no-any-return]

    @router.post("/swap", responses=errors,
                 summary="Check the gate and make the new collection serve")
    async def swap(request: SwapRequest | None = None) -> dict[str, Any]:
        result = await call(reindex().swap, allow_missing=bool(request and request.allow_missing))
        return {"gate": result.as_record(), **(await call(status))}

    @router.post("/rollback", responses=errors, summary="Make the old collection serve again")
    async def rollback() -> dict[str, Any]:
        await call(reindex().rollback)
        return await call(status)  # type: ignore[no-any-return]

    @router.post("/finish", responses=errors,
                 summary="End the migration: drop the collection that does not serve")
    async def finish() -> dict[str, Any]:
        await call(reindex().finish)
        return await call(status)  # type: ignore[no-any-return]

    return router
