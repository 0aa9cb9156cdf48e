"""``imgsearch up``'s indexing pass: publish what the mirror plan says (uploads and
deletes), follow the workers' progress from the committed offsets, report what failed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from imgsearch.files import ImageFile
from imgsearch.index import Failure
from imgsearch.mirror import FailedFiles, MirrorPlan, new_or_changed
from shared.config import Settings
from shared.errors import BrokerError

if TYPE_CHECKING:
    from shared.components import Components


def echo(message: str) -> None:
    click.echo(message, err=False)


class StopRequested(Exception):
    """Raised from a progress callback to leave a long step when a stop was asked for."""


class CommitProgress:
    """How far the ingest group has got, from its committed offsets.

    Workers commit an offset only once every record before it is stored or dead-lettered,
    so "committed >= the offset the producer was given" means done, whatever the worker's
    internals. (Tansu's end_offsets() understates batched writes: the ends come from the
    producer's acknowledgements instead.)
    """

    def __init__(self, settings: Settings) -> None:
        from shared.kafka import make_admin

        self.group = settings.kafka_group_id
        self.topic = settings.kafka_topic
        self._admin = make_admin(settings)
        self.base = self.committed()  # where the group stood before this run published

    def committed(self) -> dict[int, int]:
        from kafka.errors import KafkaError

        try:
            offsets = self._admin.list_group_offsets(self.group).get(self.group, {})
        except KafkaError as exc:
            raise BrokerError(f"cannot read the committed offsets of group {self.group!r}: "
                              f"{exc}") from exc
        return {tp.partition: om.offset for tp, om in offsets.items()
                if tp.topic == self.topic and om.offset >= 0}

    def total(self, ends: dict[int, int]) -> int:
        return sum(max(0, end - self.base.get(p, 0)) for p, end in ends.items())

    def done(self, ends: dict[int, int]) -> tuple[int, bool]:
        """(events processed towards ``ends``, whether all of them are)."""
        now = self.committed()
        processed = sum(max(0, min(now.get(p, 0), end) - self.base.get(p, 0))
                        for p, end in ends.items())
        return processed, all(now.get(p, 0) >= end for p, end in ends.items())

    def close(self) -> None:
        self._admin.close()


def failure_reasons(settings: Settings, files: Sequence[ImageFile]) -> list[Failure]:
    """Why ``files`` were not stored, from their latest dead letters in this run's topic."""
    from imgsearch.dlq import read_dead_letters
    from ingest_worker.dead_letters import H_MESSAGE, H_REASON, H_TOPIC

    by_id = {f.image_id: f for f in files}
    reasons: dict[str, tuple[str, str]] = {}
    for letter in read_dead_letters(settings, idle_s=1.0):
        errors = letter.errors
        image_id = (letter.key or b"").decode("utf-8", "replace")
        if image_id in by_id and errors.get(H_TOPIC) == settings.kafka_topic:
            reasons[image_id] = (errors.get(H_REASON, "unknown"), errors.get(H_MESSAGE, ""))
    return [
        Failure(f.path, *reasons.get(f.image_id, ("not_stored", "no dead letter found for it")))
        for f in files
    ]


def summary_line(plan: MirrorPlan, paths: Sequence[Any]) -> str:
    parts = [f"{plan.unchanged} already indexed", f"{len(plan.todo)} to index"]
    if plan.removed:
        parts.append(f"{len(plan.removed)} removed from the folders (to delete)")
    if plan.skipped:
        parts.append(f"{len(plan.skipped)} skipped (failed before and unchanged since; "
                     "--retry-failed tries them again)")
    return f"images:  {len(plan.files)} under {', '.join(map(str, paths))}: {', '.join(parts)}"


def run_plan(plan: MirrorPlan, *, label_from_folder: bool, settings: Settings, group: Any,
             components: Components, publisher: Any, failed: FailedFiles,
             check_stop: Callable[[], None], wait_stop: Callable[[float], bool],
             healthy: Callable[[], bool]) -> bool:
    """Publish the plan, show progress until the workers are done, report bad files.
    Returns False when it stopped early (a signal, or a component failed)."""
    from tqdm import tqdm

    from imgsearch.publish import publish_deletes, publish_files
    from shared.kafka import bootstrap_servers

    def advance(bar: Any) -> Callable[[int], None]:
        def step(n: int) -> None:
            bar.update(n)
            check_stop()
        return step

    todo = plan.todo
    progress = CommitProgress(settings)
    try:
        started = time.monotonic()
        try:
            with tqdm(total=len(todo) + len(plan.removed), unit="img", desc="publishing",
                      file=sys.stderr, leave=False) as bar:
                ends = publish_files(publisher, todo, label_from_folder=label_from_folder,
                                     progress=advance(bar)).offsets
                deleted = publish_deletes(publisher, plan.removed, progress=advance(bar))
        except StopRequested:
            echo("stopped before indexing; run `imgsearch up` on the same folders again")
            return False
        for partition, end in deleted.items():
            ends[partition] = max(ends.get(partition, 0), end)
        total = progress.total(ends)
        with tqdm(total=total, unit="img", desc="indexing", file=sys.stderr,
                  mininterval=0.5) as bar:
            while True:
                processed, finished = progress.done(ends)
                if processed > bar.n:
                    bar.update(processed - bar.n)
                if finished:
                    break
                if wait_stop(0.5) or not healthy():
                    bar.close()
                    echo(f"indexing interrupted after {processed} of {total} events; run "
                         "`imgsearch up` on the same folders again to finish")
                    return False
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    store = components.store
    # Whatever is not stored as published now has failed; the dead letters say why.
    missing = new_or_changed(group.pipeline, store, todo, label_from_folder=label_from_folder,
                             max_bytes=settings.fetch_max_bytes)
    still_there = store.get(plan.removed) if plan.removed else {}
    removed = len(plan.removed) - len(still_there)
    stored = len(todo) - len(missing)
    rate = f" ({len(todo) / max(elapsed, 1e-9):.1f} img/s)" if todo else ""
    echo(f"indexed: {stored} stored, {len(missing)} failed, {removed} removed in "
         f"{elapsed:.1f}s{rate}")
    if stored or removed:
        # The embedded engine builds its HNSW index only when asked, and holds the
        # interpreter while it does: searches wait for it, so say so.
        t0 = time.monotonic()
        echo("index:   building the search index (searches wait until it is done)")
        store.optimize()
        echo(f"index:   built in {time.monotonic() - t0:.1f}s")
    failures = failure_reasons(settings, missing) if missing else []
    missing_ids = {f.image_id for f in missing}
    failed.update(failures, [f for f in todo if f.image_id not in missing_ids])
    if failures:
        echo(f"{len(failures)} files could not be indexed; `up` skips them until they change "
             f"(their events are in the dead-letter topic {settings.kafka_dlq_topic!r} on "
             f"{','.join(bootstrap_servers(settings))}: `imgsearch dlq list` beside this "
             "`up` shows them):")
        for failure in failures:
            echo(f"  {failure}")
    if still_there:
        echo(f"{len(still_there)} removed files are still in the index (first: "
             f"{next(iter(still_there))}); the next `up` tries again")
    return True
