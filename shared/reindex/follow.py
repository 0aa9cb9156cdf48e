"""A process configured for a spec its index has migrated away from follows the index.

After a re-index is finished, the old collection is gone; a worker or API replica that
restarts with the old MODEL_NAME would otherwise refuse to start (its spec matches nothing)
until someone edits its configuration. Instead it loads the serving collection's spec,
from that collection's own metadata (``load``), and says so. Only a spec that the index
*moved away from* is followed (it is in the migration history): any other mismatch is a
configuration mistake, and is refused as before.
"""

from __future__ import annotations

import logging

from shared.config import Settings
from shared.errors import CollectionMismatchError
from shared.reindex.spec import with_spec
from shared.store.aliases import compatible, describe_spec, spec_info
from shared.store.base import CollectionSpec
from shared.store.factory import open_catalog

log = logging.getLogger(__name__)

REINDEX_HINT = ("To move the index to this spec while it keeps serving, run `imgsearch "
                "reindex start` (docs/migration.md).")


def followed_settings(settings: Settings, spec: CollectionSpec,
                      error: CollectionMismatchError) -> Settings | None:
    """The settings of the spec serving the index, when ``spec`` is one it migrated away
    from; None otherwise. Raises ``error`` with a hint when the mismatch is not that."""
    catalog = open_catalog(settings)
    try:
        logical = settings.qdrant_collection
        serving = catalog.resolve(logical)
        record = catalog.read_record(logical) or {}
        metadata = catalog.stored_metadata(serving) if serving else None
    finally:
        catalog.close()
    former = [entry.get("source_info") for entry in record.get("history") or []
              if entry.get("outcome") == "finished"]
    moved_away = any(compatible(spec, {"imgsearch": info}) for info in former if info)
    load = spec_info(metadata).get("load")
    if not moved_away or not load:
        raise CollectionMismatchError(f"{error} {REINDEX_HINT}") from error
    log.warning("this process is configured for a spec index %r migrated away from; it "
                "follows the index and serves collection %r (%s). Update MODEL_NAME and the "
                "vector settings to silence this.", logical, serving, describe_spec(metadata))
    return with_spec(settings, load)
