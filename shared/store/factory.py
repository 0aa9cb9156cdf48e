"""Open the vector store that the configuration names, and its catalog.

A process is configured for a logical index (QDRANT_COLLECTION) and a spec (the model and
vector settings). ``choose_collection`` picks the physical collection it opens:

1. nothing serves the index yet: the collection named QDRANT_COLLECTION, created;
2. the serving collection, when it was built for this spec;
3. otherwise a collection of the index's migration in progress built for this spec (a
   worker or API started for the target, or for the source after the swap);
4. otherwise the serving one, whose check then refuses the spec (CollectionMismatchError,
   saying what it was built with).
"""

from __future__ import annotations

from dataclasses import replace

from shared.config import Settings
from shared.store.aliases import Catalog, FileCatalog, compatible
from shared.store.base import CollectionSpec, VectorStore


def open_catalog(settings: Settings) -> Catalog:
    """The catalog of the configured store (a Qdrant server, or the embedded directory)."""
    if settings.qdrant_url:
        from shared.store.qdrant import QdrantCatalog

        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantCatalog.connect(settings.qdrant_url, api_key=api_key,
                                     timeout_s=settings.qdrant_timeout_s)
    return FileCatalog(settings.embedded_store_path)


def choose_collection(catalog: Catalog, spec: CollectionSpec) -> str:
    """The physical collection a process configured for ``spec`` opens (see above)."""
    logical = spec.name
    serving = catalog.resolve(logical)
    if serving is None:
        return logical
    candidates = [serving]
    record = catalog.read_record(logical) or {}
    migration = record.get("migration") or {}
    if migration.get("active"):
        candidates += [migration.get("target"), migration.get("source")]
    for name in dict.fromkeys(c for c in candidates if c):
        if compatible(spec, catalog.stored_metadata(name)):
            return name
    return serving


def open_store(settings: Settings, spec: CollectionSpec, *,
               physical: str | None = None) -> VectorStore:
    """QDRANT_URL selects a Qdrant server; otherwise the embedded store at QDRANT_PATH.
    ``spec.name`` is the logical index; ``physical`` opens that collection of it instead
    of the one ``choose_collection`` picks."""
    if physical is None:
        catalog = open_catalog(settings)
        try:
            physical = choose_collection(catalog, spec)
        finally:
            catalog.close()
    spec = replace(spec, name=physical)
    if settings.qdrant_url:
        from shared.store.qdrant import QdrantStore

        api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        return QdrantStore.connect(
            settings.qdrant_url, spec, api_key=api_key, timeout_s=settings.qdrant_timeout_s
        )
    from shared.store.edge import EdgeStore

    return EdgeStore(settings.embedded_store_path, spec)
