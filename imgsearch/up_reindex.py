"""``imgsearch up`` on a data directory built with another spec: serve it, migrate it.

``up --model NEW`` (or new vector settings) on a data directory whose index serves another
spec no longer refuses. It serves the collection it has, with that collection's own
model; it starts a migration to the new spec (shared/reindex/); its workers write every
event to both collections; a background thread re-embeds the stored images with a
progress bar, reconciles, checks the gate, and swaps. The API switches at the swap, and
the next ``up`` serves the new spec. The old collection stays, written, for a rollback,
until ``imgsearch reindex finish``.

Without an explicit spec (no --model, --weights, MODEL_*, VECTOR_* or QUANTIZATION), ``up``
serves whatever its data directory serves, with the spec recorded in the collection.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from shared.components import Components, collection_spec
from shared.config import Settings
from shared.errors import CollectionMismatchError
from shared.reindex.backfill import GateResult
from shared.reindex.controller import Reindex
from shared.reindex.runner import Runner
from shared.reindex.spec import load_settings_of, with_spec
from shared.reindex.specs import SpecSet
from shared.store.aliases import compatible, describe_spec, spec_info
from shared.store.factory import open_catalog

log = logging.getLogger(__name__)


def echo(message: str) -> None:
    click.echo(message, err=False)


def load_serving(settings: Settings, *, explicit: bool) -> tuple[Components, dict[str, Any] | None]:
    """The Components ``up`` serves with, and the spec to migrate to (None: no change)."""
    catalog = open_catalog(settings)
    try:
        serving = catalog.resolve(settings.qdrant_collection)
        metadata = catalog.stored_metadata(serving) if serving else None
    finally:
        catalog.close()
    load = spec_info(metadata).get("load")
    if serving is None:
        return Components.load(settings), None
    if not explicit:
        if load:  # the data directory says what it serves
            return Components.load(with_spec(settings, load)), None
        return Components.load(settings), None  # an older one: its check says if it fits
    from shared.embedding import Embedder

    embedder = Embedder.from_settings(settings)
    if compatible(collection_spec(settings, embedder), metadata):
        return Components.load(settings, embedder=embedder), None
    if not load:
        raise CollectionMismatchError(
            f"the data directory's index is built with {describe_spec(metadata)}, and does not "
            "record how to load that model, so `up` cannot serve it while it migrates to "
            f"{settings.model_name}. Run `imgsearch up` once with its model (--model "
            f"{spec_info(metadata).get('model_name')} and its --weights), which records it; "
            "then again with the new one.")
    source = with_spec(settings, load)
    same = load.get("model_name") == settings.model_name and load.get("model_weights") == (
        str(settings.model_weights.absolute()) if settings.model_weights else None)
    components = Components.load(source, embedder=embedder if same else None)
    return components, load_settings_of(settings)


class UpMigration:
    """The in-process migration of ``up``: started (or resumed) before the workers consume,
    run in a thread, shown as a progress bar, swapped when the gate passes."""

    def __init__(self, specs: SpecSet) -> None:
        self.specs = specs
        self.reindex = Reindex(specs, say=echo)
        self._bar: Any = None
        self.runner = Runner(self.reindex, swap=True, on_progress=self._progress,
                             on_end=self._ended)

    def begin(self, target: dict[str, Any] | None) -> bool:
        """Create the migration to ``target`` now (so the workers dual-write from their
        first event), or find one to resume. True when there is a backfill to run."""
        if target is not None:
            self.reindex.start(target)
            return True
        migration = self.reindex.migration()
        if migration is None or not migration.active:
            return False
        if migration.state in ("swapped", "rolled_back", "ready"):
            serving = self.specs.catalog.resolve(self.specs.logical)
            echo(f"reindex: migration {migration.id} is {migration.state}: {serving} serves; "
                 f"`imgsearch reindex {'finish' if migration.state == 'swapped' else 'swap'}`"
                 " beside this `up` completes it (both collections are written meanwhile)")
            return False
        echo(f"reindex: resuming migration {migration.id} ({migration.state}) to "
             f"{migration.target_spec}")
        return True

    def run(self) -> None:
        self.runner.start(None)

    def _progress(self, progress: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(unit="img", desc="re-indexing", file=sys.stderr, mininterval=0.5)
        self._bar.total = int(progress.get("total") or 0)
        self._bar.n = int(progress.get("done") or 0)
        self._bar.set_postfix(rate=progress.get("rate"), refresh=False)
        self._bar.refresh()

    def _ended(self, result: GateResult | None, error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if error is not None:
            echo(f"reindex: failed: {error}; `up` keeps serving "
                 f"{self.specs.catalog.resolve(self.specs.logical)}; restart `up` (or "
                 "`imgsearch reindex start`) to resume")
        elif result is not None and result.passed:
            echo("reindex: the next `imgsearch up` serves the new spec; `imgsearch reindex "
                 "finish` drops the old collection, `imgsearch reindex rollback` goes back")
        elif result is not None:
            echo("reindex: not swapped; `imgsearch reindex status` says why")

    def stop(self) -> None:
        if self.runner.running:
            echo("reindex: stopping the backfill (it resumes on the next `up`)")
        self.runner.stop()
