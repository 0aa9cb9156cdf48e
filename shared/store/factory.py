"""Open the vector store that the configuration names."""

from __future__ import annotations

from shared.config import Settings
from shared.store.base import CollectionSpec, VectorStore


def open_store(settings: Settings, spec: CollectionSpec) -> VectorStore:
    """QDRANT_URL selects a Qdrant server; otherwise the embedded store at QDRANT_PATH."""
    if settings.qdrant_url:
        from shared.store.qdrant import QdrantStore

        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantStore.connect(
            settings.qdrant_url, spec, api_key=api_key, timeout_s=settings.qdrant_timeout_s
        )
    from shared.store.edge import EdgeStore

    return EdgeStore(settings.embedded_store_path, spec)
