"""The API's wire models: what goes over HTTP, as the OpenAPI document describes it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from query_api.pinned import current_collection, current_spec

MetadataValue = str | bool | int | float


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable snake_case reason, for programs to branch on.")
    message: str = Field(description="What went wrong and what to do about it, for people.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems (422 only): location, message, type."
    )


class ErrorResponse(BaseModel):
    """Every error, whatever its status, has this shape."""

    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"code": "undecodable", "message": "not a recognised image format"}}]
        }
    )


class CropInfo(BaseModel):
    """A part of an image that was embedded: a detected object, or the whole image."""

    model_config = ConfigDict(populate_by_name=True)

    cropped: bool = Field(description="True for a detected object, false for the whole image.")
    box: list[float] = Field(description="[x0, y0, x1, y1] in the image's original pixels.")
    object_class: str | None = Field(
        None, alias="class", description="The detector's class name (COCO), if cropped."
    )
    confidence: float | None = Field(None, description="The detector's confidence, if cropped.")


class SearchHit(BaseModel):
    image_id: str
    score: float = Field(description="Cosine similarity, -1..1; higher is more alike.")
    uri: str | None = Field(description="Where the image was ingested from; null for uploads.")
    metadata: dict[str, MetadataValue] | None = Field(
        description="The image's metadata; null when with_metadata=false."
    )
    matched: CropInfo | None = Field(
        None,
        description="The stored part that matched best: a detected object (CROP_MODE=all "
        "or largest) or the whole image; null for images ingested before crops were recorded.",
    )


class QueryTiming(BaseModel):
    """Where the time of this query went, in milliseconds."""

    total_ms: float
    read_ms: float | None = Field(None, description="Receiving the request body.")
    decode_ms: float | None = Field(None, description="Decoding and preprocessing the image.")
    detect_ms: float | None = Field(None, description="Finding objects to crop (crop != none).")
    queue_ms: float | None = Field(None, description="Waiting to join a forward pass.")
    embed_ms: float | None = Field(None, description="The forward pass this query shared.")
    batch_size: int | None = Field(None, description="Queries embedded in that forward pass.")
    lookup_ms: float | None = Field(None, description="Reading the stored vector (similar).")
    search_ms: float = Field(description="The vector store query.")


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    limit: int
    offset: int
    next_offset: int | None = Field(
        description="Offset of the next page, or null when this page was not full."
    )
    query_image_id: str | None = Field(
        None, description="The stored image searched by (similar); null for uploads."
    )
    crop: str | None = Field(
        None, description="How the query image was cropped: none, largest or all (uploads)."
    )
    query_crops: list[CropInfo] | None = Field(
        None, description="The parts of the query image that were searched with (uploads)."
    )
    model: str
    # --- Re-index: which spec answered (query_api/serving.py pins it per request) ---
    spec: str | None = Field(
        default_factory=current_spec,
        description="Digest (12 hex characters) of the embedding spec that answered: model, "
                    "weights, preprocessing, reduction, quantization. It changes when the "
                    "index is swapped to another spec (docs/migration.md).")
    collection: str | None = Field(
        default_factory=current_collection,
        description="The physical collection searched (the index's alias target).")
    timing: QueryTiming


class StoredImageResponse(BaseModel):
    """The payload stored with an image by the ingest workers."""

    model_config = ConfigDict(extra="allow")

    image_id: str
    uri: str | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    model: str | None = None
    sha256: str | None = None
    event_id: str | None = None
    ingested_at: str | None = None


class UploadAccepted(BaseModel):
    status: str = Field("accepted", description="Always 'accepted': a worker will ingest it.")
    event_id: str
    image_id: str
    topic: str
    partition: int
    offset: int


class CountResponse(BaseModel):
    count: int


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    status: str = "ready"
    model: str
    dim: int
    device: str
    batching: bool
    collection: str
    crop: str = Field("none", description="How queries are cropped by default (CROP_MODE).")
    # --- Re-index (docs/migration.md) ---
    spec: str | None = Field(None, description="Digest of the embedding spec serving now.")
    serving_collection: str | None = Field(
        None, description="The physical collection the index's alias points to, searched now.")
    migration: dict[str, Any] | None = Field(
        None, description="The migration in progress (id, state, source, target, done, "
                          "total), or null.")


class FacetValue(BaseModel):
    value: MetadataValue = Field(description="A stored value of the key, exactly as stored.")
    count: int = Field(description="How many images have it.")
    filter: str = Field(
        description="The `filter=` parameter that selects these images, quoted where the "
                    "value would otherwise be read as a number or boolean."
    )


class FacetsResponse(BaseModel):
    key: str
    values: list[FacetValue] = Field(description="Most frequent first.")
