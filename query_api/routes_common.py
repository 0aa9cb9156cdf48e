"""What the route modules share: the per-app Service and the image id path parameter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Path as PathParam

from query_api.auth import KeyChecker
from query_api.engine import QueryEngine
from query_api.publishing import Publishing
from query_api.thumbnails import ThumbnailService
from shared.config import Settings
from shared.metadata import MAX_IMAGE_ID

STATIC_DIR = Path(__file__).resolve().parent / "static"

ImageId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_IMAGE_ID, description="The image's id.")
]


@dataclass
class Service:
    settings: Settings
    engine: QueryEngine
    thumbnails: ThumbnailService
    publishing: Publishing
    keys: KeyChecker
    collection: str
