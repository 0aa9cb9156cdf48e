"""``imgsearch up``: the whole system in one process, with no Docker and no servers to install.

* Broker: the Kafka at KAFKA_BOOTSTRAP_SERVERS when that variable is set; otherwise a
  local Tansu broker (imgsearch/local_broker.py), which keeps events in memory.
* Store: the embedded Qdrant store in the data directory; it persists across runs.
* Ingest: ingest_worker.service.WorkerGroup, the code ``python -m ingest_worker`` runs,
  fed with the events ``imgsearch publish`` sends.
* API and search page: query_api.app.create_app, served by uvicorn in a thread
  (imgsearch/api_thread.py).
* The index mirrors the folders: new and changed files are published, removed ones
  deleted, files that failed are not retried until they change (imgsearch/mirror.py).
* Other commands find it: imgsearch/stack.py records the broker and page in the data
  directory while it runs.
* A new model (or reduction, quantization) on a data directory built with another one is
  a migration, not a refusal: the old collection serves while a background re-index
  builds the new one, then they swap (imgsearch/up_reindex.py, docs/migration.md).

SIGINT and SIGTERM stop it in order: workers finish their work in flight, the API stops, the
store is flushed and closed, the broker is terminated.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click

from imgsearch import stack as running
from imgsearch.api_thread import ApiServer, bind_socket
from imgsearch.files import ImageFile
from imgsearch.index import MODEL_HELP, WEIGHTS_HELP, model_overrides, with_roots
from imgsearch.up_ingest import StopRequested, echo, run_plan, summary_line
from shared.config import Settings
from shared.errors import ImgSearchError

# Tansu completes a group join after about half the session timeout: with the production
# default (45 s) a fresh `up` would sit idle for ~20 s before its first batch. Heartbeats
# come from kafka-python's own thread, so a short session does not limit batch time.
LOCAL_BROKER_GROUP = {"kafka_session_timeout_ms": 6000, "kafka_heartbeat_interval_ms": 500}
EXTERNAL_KAFKA_GROUP = "imgsearch-up"  # unless KAFKA_GROUP_ID is set
# Hosts on which `up`'s API offers /admin/reindex without API keys (imgsearch reindex uses it).
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHOW_SKIPPED = 10


@dataclass
class UpOptions:
    paths: Sequence[Path] = ()
    data_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None
    model: str | None = None
    weights: Path | None = None
    label_from_folder: bool = True
    mirror: bool = True
    retry_failed: bool = False


# -- signals -------------------------------------------------------------------------------


class Stopper:
    """SIGINT and SIGTERM. While starting up they abort (KeyboardInterrupt, so every
    ``finally`` runs); once serving they ask for a clean stop; a second one is ignored
    so that the shutdown itself is never cut short."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.serving = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.requested.is_set():
            raise StopRequested()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            click.echo(f"{name}: already stopping, please wait", err=True)
            return
        self.requested.set()
        click.echo(f"{name}: stopping (workers finish their work in flight)", err=True)
        if not self.serving:
            raise KeyboardInterrupt


# -- the command ----------------------------------------------------------------------------------


def up_settings(opts: UpOptions, **extra: Any) -> Settings:
    from imgsearch.cli import settings_or_exit

    base = settings_or_exit()
    overrides: dict[str, Any] = {
        "image_file_roots": with_roots(base.image_file_roots, opts.paths),
        **model_overrides(opts.model, opts.weights),
        **extra,
    }
    if opts.data_dir is not None:
        overrides["qdrant_path"] = opts.data_dir
    return settings_or_exit(**overrides)


def external_broker() -> str | None:
    """KAFKA_BOOTSTRAP_SERVERS only when set in the environment: the default is no broker."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


def run_up(opts: UpOptions) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    stopper = Stopper()
    stopper.install()
    try:
        return _run(opts, stopper)
    except KeyboardInterrupt:
        click.echo("stopped during start-up", err=True)
        return 130
    except ImgSearchError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        stopper.restore()


def _collect(paths: Sequence[Path]) -> list[ImageFile]:
    from imgsearch.publish import collect

    try:
        files = collect(list(paths))
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not files:
        # Not an error: the folders may have been emptied, and mirroring them deletes
        # what they held.
        click.echo(f"warning: no image files under {', '.join(map(str, paths))}", err=True)
    return files


def _check_not_running(data_dir: Path) -> None:
    other = running.find(data_dir)
    if other is not None:
        raise click.ClickException(
            f"{other.describe()} is already serving {data_dir}: open {other.api_url}/, or "
            "stop it (Ctrl-C in its terminal) before starting another, or give this one "
            "another --data-dir.")


def _run(opts: UpOptions, stopper: Stopper) -> int:
    from shared.logs import setup_logging

    settings = up_settings(opts)  # fail on bad configuration before starting anything
    setup_logging(os.environ.get("LOG_LEVEL", "WARNING"))
    data_dir = settings.embedded_store_path
    # What can refuse to start does so at once (before torch is even imported), and
    # before anything is created.
    _check_not_running(data_dir)
    sock = bind_socket(opts.host, opts.port)
    files = _collect(opts.paths) if opts.paths else []

    from imgsearch.local_broker import LocalBroker
    from imgsearch.up_reindex import UpMigration, load_serving
    from ingest_worker.service import WorkerGroup
    from shared.kafka import EventPublisher, ensure_topics
    from shared.reindex.spec import explicit_spec
    from shared.reindex.specs import SpecSet

    query_api_app = _import_create_app()

    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        bootstrap = external_broker()
        extra: dict[str, Any] = {}
        if bootstrap:
            if "KAFKA_GROUP_ID" not in os.environ:
                # Not the production workers' default group: joining it would take their
                # events into this process's store instead of theirs.
                extra["kafka_group_id"] = EXTERNAL_KAFKA_GROUP
            echo(f"broker:  Kafka at {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)")
        else:
            broker = LocalBroker()
            broker.start()
            stack.callback(_stop_broker, broker)
            extra = {"kafka_bootstrap_servers": broker.bootstrap}
            extra.update({k: v for k, v in LOCAL_BROKER_GROUP.items()
                          if k.upper() not in os.environ})
            echo(f"broker:  local Tansu, pid {broker.pid}, on {broker.bootstrap} "
                 "(events in memory; set KAFKA_BOOTSTRAP_SERVERS to use Kafka)")
        settings = up_settings(opts, **extra)
        try:
            ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic])
        except Exception as exc:  # kafka-python's errors have no common base worth naming
            raise click.ClickException(
                f"cannot create topics on Kafka at {settings.kafka_bootstrap_servers}: {exc}"
            ) from exc

        echo(f"model:   loading {settings.model_name} "
             f"({settings.model_weights or 'pretrained weights: the cache, else the model hub'})")
        try:
            # A data directory built with another spec is served as it is, and migrated in
            # the background when this `up` asks for a new one (imgsearch/up_reindex.py).
            components, target = load_serving(settings, explicit=explicit_spec(settings))
        except ImgSearchError as exc:
            hint = "" if "--weights" in str(exc) or "--model" in str(exc) else f"\n{_model_hint()}"
            raise click.ClickException(f"{exc}{hint}") from exc
        stack.callback(components.close)
        specs = SpecSet(components)  # the collections of the index: one set for API and workers
        stack.callback(specs.close)
        specs.start()
        migration = UpMigration(specs)
        try:
            backfill = migration.begin(target)
        except ImgSearchError as exc:
            raise click.ClickException(f"cannot migrate to {settings.model_name}: {exc}") from exc
        physical = components.store.spec.name
        echo(f"store:   {settings.store_location}, collection {settings.qdrant_collection!r}"
             + (f" ({physical})" if physical != settings.qdrant_collection else "")
             + f", {components.store.count()} images")

        publisher = EventPublisher(settings)
        stack.callback(publisher.close)
        api_settings = components.settings.model_copy(update={
            "reindex_admin_api": opts.host in LOOPBACK or bool(settings.api_keys)})
        app = query_api_app(components, publisher=publisher, settings=api_settings, specs=specs)
        app.state.serving.runner = migration.runner
        api = ApiServer(app, sock)
        api.start()
        stack.callback(api.stop)
        echo(f"search:  {api.url}/  (API docs {api.url}/docs)")

        group = WorkerGroup(components, count=opts.workers, specs=specs)
        group.start()
        stack.callback(group.close)
        echo(f"ingest:  {len(group.workers)} worker(s) on topic {settings.kafka_topic!r}")
        if backfill:
            migration.run()
        stack.callback(migration.stop)
        _record(settings, api, data_dir, local_broker=not bootstrap)
        stack.callback(running.clear, data_dir)
        stopper.serving = True  # from here a signal asks for a clean stop

        def healthy() -> bool:
            if group.errors or not group.alive:
                click.echo(f"error: the ingest workers stopped: {group.errors[:1]}", err=True)
                return False
            if not api.alive:
                click.echo(f"error: the query API stopped: {api.error!r}", err=True)
                return False
            return True

        status = 0
        if opts.paths and not _mirror(files, opts, settings, group, components, publisher,
                                      stopper, healthy):
            status = 0 if stopper.requested.is_set() else 1
        if not stopper.requested.is_set() and status == 0:
            echo(f"ready:   {components.store.count()} images; search at {api.url}/ "
                 "(Ctrl-C to stop)")
            while not stopper.requested.wait(0.5):
                if not healthy():
                    status = 1
                    break
        echo("stopping: workers finish their work in flight, then the API and the store close")
    echo("stopped cleanly" if status == 0 else "stopped after an error")
    return status


def _record(settings: Settings, api: ApiServer, data_dir: Path, *, local_broker: bool) -> None:
    running.record(running.RunningStack(
        pid=os.getpid(), api_url=api.url, bootstrap=settings.kafka_bootstrap_servers,
        topic=settings.kafka_topic, dlq_topic=settings.kafka_dlq_topic,
        group=settings.kafka_group_id, collection=settings.qdrant_collection,
        data_dir=str(data_dir), file_roots=[str(r) for r in settings.image_file_roots],
        local_broker=local_broker,
    ))


def _mirror(files: list[ImageFile], opts: UpOptions, settings: Settings, group: Any,
            components: Any, publisher: Any, stopper: Stopper,
            healthy: Callable[[], bool]) -> bool:
    """Make the index mirror the folders. False when it stopped early."""
    from tqdm import tqdm

    from imgsearch.mirror import FailedFiles, mirror_roots, plan

    failed = FailedFiles.for_collection(settings.embedded_store_path, settings.qdrant_collection)

    def step(bar: Any) -> Callable[[int], None]:
        def advance(n: int) -> None:
            bar.update(n)
            stopper.check()
        return advance

    try:
        with tqdm(total=len(files), unit="img", desc="checking", file=sys.stderr,
                  leave=False) as bar:
            todo = plan(group.pipeline, components.store, files, mirror_roots(opts.paths),
                        failed, label_from_folder=opts.label_from_folder,
                        max_bytes=settings.fetch_max_bytes, mirror=opts.mirror,
                        retry_failed=opts.retry_failed, progress=step(bar))
    except StopRequested:
        echo("stopped before indexing; run `imgsearch up` on the same folders again")
        return False
    echo(summary_line(todo, opts.paths))
    for known in todo.skipped[:SHOW_SKIPPED]:
        echo(f"  skipped {known.path}: {known.reason}: {known.message}")
    if len(todo.skipped) > SHOW_SKIPPED:
        echo(f"  ... and {len(todo.skipped) - SHOW_SKIPPED} more ({failed.path})")
    try:
        if todo.empty:
            return True
        return run_plan(todo, label_from_folder=opts.label_from_folder, settings=settings,
                        group=group, components=components, publisher=publisher,
                        failed=failed, check_stop=stopper.check,
                        wait_stop=stopper.requested.wait, healthy=healthy)
    finally:
        failed.prune()
        failed.save()


def _stop_broker(broker: Any) -> None:
    broker.stop()
    echo("broker:  stopped")


def _import_create_app() -> Callable[..., Any]:
    try:
        from query_api.app import create_app
    except ImportError as exc:
        raise click.ClickException(f"the query API cannot be imported: {exc}") from exc
    return create_app


def _model_hint() -> str:
    return ("On the command line: imgsearch up --model MODEL_NAME --weights FILE PATH..., "
            "e.g. --model mobilenetv2_100 --weights mobilenetv2_100.safetensors")


def up_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `up` and `demo` share."""
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where the embedded store keeps its files (QDRANT_PATH; default "
                          "./data). It persists: the next `up` serves what this one indexed."),
        click.option("--host", default="127.0.0.1", show_default=True,
                     help="Address the API and search page listen on."),
        click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
                     help="Port of the API and search page (0: any free port)."),
        click.option("--workers", type=click.IntRange(1, 64),
                     help="Ingest workers (WORKER_CONCURRENCY; default 1)."),
        click.option("--model", help=MODEL_HELP),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help=WEIGHTS_HELP),
        click.option("--label-from-folder/--no-label-from-folder", default=True,
                     show_default=True,
                     help="Store each file's parent folder name as metadata 'label'."),
        click.option("--mirror/--no-mirror", default=True, show_default=True,
                     help="Delete from the index the images whose files were removed from "
                          "PATHS since the last run (only images whose file:// source is "
                          "under PATHS; uploads through the API are never touched)."),
        click.option("--retry-failed", is_flag=True,
                     help="Publish again the files that failed before (not an image, too "
                          "large) even if they did not change since."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


UP_EPILOG = """\b
Examples:
  imgsearch up ~/Pictures
  imgsearch up --model mobilenetv2_100 --weights mobilenetv2_100.safetensors photos/

\b
Offline: the default model's weights come from the Hugging Face hub on first use
(then cached). Without internet, set MODEL_WEIGHTS (--weights) to a weights file
and MODEL_NAME (--model) to the timm model it belongs to.

\b
While it runs, `imgsearch dlq list`, `publish`, `search` and `index` started from
the same folder (or with the same --data-dir) find it: it records its broker and
page in DATA_DIR/imgsearch-up/running.json.

\b
A different --model (or --weights, VECTOR_*, QUANTIZATION) on a data directory
built with another spec: `up` serves what it has, re-indexes in the background
and swaps when done; the next `up` serves the new spec. `imgsearch reindex
status|swap|rollback|finish` beside it (docs/migration.md).
"""


@click.command("up", epilog=UP_EPILOG)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@up_options
def up(paths: tuple[Path, ...], **options: Any) -> None:
    """Run the whole system in one process and index the images under PATHS.

    Starts a local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the embedded store,
    ingest workers, and the query API with its search page; publishes the new or changed
    images under PATHS, deletes from the index those whose files are gone, and shows
    indexing progress. Ctrl-C stops everything cleanly.
    """
    sys.exit(run_up(UpOptions(paths=paths, **options)))
