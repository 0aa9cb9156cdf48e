"""``imgsearch up``: the whole system in one process, with no Docker and no servers to install.

* Broker: the Kafka at KAFKA_BOOTSTRAP_SERVERS when that variable is set; otherwise a
  local Tansu broker (imgsearch/local_broker.py), which keeps events in memory.
* Store: the embedded Qdrant store in the data directory; it persists across runs.
* Ingest: ingest_worker.service.WorkerGroup, the code ``python -m ingest_worker`` runs,
  fed with the events ``imgsearch publish`` sends.
* API and search page: query_api.app.create_app, served by uvicorn in a thread.

SIGINT and SIGTERM stop it in order: workers finish their work in flight, the API stops, the
store is flushed and closed, the broker is terminated.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from imgsearch.files import ImageFile
from imgsearch.index import (
    MODEL_HELP,
    WEIGHTS_HELP,
    Failure,
    file_event,
    model_overrides,
    with_roots,
)
from shared.config import Settings
from shared.errors import BrokerError, ImgSearchError
from shared.images import sha256_hex

if TYPE_CHECKING:  # these import torch: keep `imgsearch --help` fast
    from shared.components import Components
    from shared.pipeline import IngestPipeline
    from shared.store.base import VectorStore

# Tansu completes a group join after about half the session timeout: with the production
# default (45 s) a fresh `up` would sit idle for ~20 s before its first batch. Heartbeats
# come from kafka-python's own thread, so a short session does not limit batch time.
LOCAL_BROKER_GROUP = {"kafka_session_timeout_ms": 6000, "kafka_heartbeat_interval_ms": 500}
EXTERNAL_KAFKA_GROUP = "imgsearch-up"  # unless KAFKA_GROUP_ID is set
API_START_TIMEOUT_S = 60.0
API_STOP_TIMEOUT_S = 15.0
CHECK_CHUNK = 256


def echo(message: str) -> None:
    click.echo(message, err=False)


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


# -- signals -------------------------------------------------------------------------------


class StopRequested(Exception):
    """Raised from a progress callback to leave a long step when a stop was asked for."""


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


# -- progress --------------------------------------------------------------------------------


class CommitProgress:
    """How far the ingest group has got, from its committed offsets.

    Workers commit an offset only once every record before it is stored or dead-lettered,
    so "committed >= the offset the producer was given" means done, whatever the worker's
    internals. (Tansu's end_offsets() understates batched writes: the ends come from the
    producer's acknowledgements instead.)
    """

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaAdminClient

        from shared.kafka import bootstrap_servers

        self.group = settings.kafka_group_id
        self.topic = settings.kafka_topic
        self._admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(settings),
                                       client_id=f"{settings.kafka_client_id}-progress")
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


def new_or_changed(
    pipeline: IngestPipeline,
    store: VectorStore,
    files: Sequence[ImageFile],
    *,
    label_from_folder: bool,
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> list[ImageFile]:
    """Files whose stored point differs from what publishing them would store.

    A second `up` over the same folder then publishes nothing. The comparison is the
    pipeline's own (bytes, URI, metadata, model), so both agree on "unchanged".
    """
    todo: list[ImageFile] = []
    for start in range(0, len(files), CHECK_CHUNK):
        chunk = files[start : start + CHECK_CHUNK]
        stored = store.get([f.image_id for f in chunk])
        for f in chunk:
            have = stored.get(f.image_id)
            if have is None or _differs(pipeline, f, have.payload, label_from_folder, max_bytes):
                todo.append(f)
        if progress:
            progress(len(chunk))
    return todo


def _differs(pipeline: IngestPipeline, f: ImageFile, payload: dict[str, Any],
             label_from_folder: bool, max_bytes: int) -> bool:
    try:
        if f.path.stat().st_size > max_bytes:
            return True  # the worker will refuse it and say why
        data = f.path.read_bytes()
    except OSError:
        return True  # the worker reports the read error
    event = file_event(f, label_from_folder=label_from_folder)
    # One rule for "unchanged", shared with the pipeline (see the report on making it public).
    return not pipeline.is_unchanged(event, sha256_hex(data), payload)


# -- the API in a thread -------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}. Is another `imgsearch up` "
            "running? Choose another port with --port."
        ) from exc
    return sock


class ApiServer:
    """uvicorn serving the query API in a thread of this process (no signal handlers there)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.socket = bind_socket(host, port)
        self.host = host
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(app, lifespan="on", log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="api")
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # noqa: BLE001 - SystemExit when the lifespan fails
            self.error = exc

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise click.ClickException(
                    f"the query API did not start ({self.error!r}); see the log above")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(API_STOP_TIMEOUT_S)
        self.socket.close()


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


def _run(opts: UpOptions, stopper: Stopper) -> int:
    from imgsearch.local_broker import LocalBroker
    from imgsearch.publish import collect, publish_files
    from ingest_worker.service import WorkerGroup
    from shared.components import Components
    from shared.kafka import EventPublisher, ensure_topics
    from shared.logs import setup_logging

    settings = up_settings(opts)  # fail on bad configuration before starting anything
    setup_logging(os.environ.get("LOG_LEVEL", "WARNING"))
    files: list[ImageFile] = []
    if opts.paths:
        try:
            files = collect(list(opts.paths))
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
        if not files:
            raise click.ClickException(f"no image files under {', '.join(map(str, opts.paths))}")
    query_api_app = _import_create_app()

    with contextlib.ExitStack() as stack:
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
             f"({settings.model_weights or 'pretrained weights from the hub, cached'})")
        try:
            components = Components.load(settings)
        except ImgSearchError as exc:
            raise click.ClickException(f"{exc}\n{_model_hint()}") from exc
        stack.callback(components.close)
        echo(f"store:   {settings.store_location}, collection {settings.qdrant_collection!r}, "
             f"{components.store.count()} images")

        publisher = EventPublisher(settings)
        stack.callback(publisher.close)
        api = ApiServer(query_api_app(components, publisher=publisher, settings=settings),
                        opts.host, opts.port)
        api.start()
        stack.callback(api.stop)
        echo(f"search:  {api.url}/  (API docs {api.url}/docs)")

        group = WorkerGroup(components, count=opts.workers)
        group.start()
        stack.callback(group.close)
        echo(f"ingest:  {len(group.workers)} worker(s) on topic {settings.kafka_topic!r}")
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
        if files and not _ingest(files, opts, settings, group, components, publisher,
                                 stopper, healthy, publish_files):
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


def _ingest(files: list[ImageFile], opts: UpOptions, settings: Settings, group: Any,
            components: Components, publisher: Any, stopper: Stopper,
            healthy: Callable[[], bool], publish_files: Callable[..., Any]) -> bool:
    """Publish what is new, show progress until the workers are done, report bad files.
    Returns False when it stopped early (a signal, or a component failed)."""
    from tqdm import tqdm

    def advance(bar: Any) -> Callable[[int], None]:
        def step(n: int) -> None:
            bar.update(n)
            stopper.check()
        return step

    progress = CommitProgress(settings)
    try:
        try:
            with tqdm(total=len(files), unit="img", desc="checking", file=sys.stderr,
                      leave=False) as bar:
                todo = new_or_changed(group.pipeline, components.store, files,
                                      label_from_folder=opts.label_from_folder,
                                      max_bytes=settings.fetch_max_bytes, progress=advance(bar))
            echo(f"images:  {len(files)} under {', '.join(map(str, opts.paths))}: "
                 f"{len(files) - len(todo)} already indexed, {len(todo)} to index")
            if not todo:
                return True
            started = time.monotonic()
            with tqdm(total=len(todo), unit="img", desc="publishing", file=sys.stderr,
                      leave=False) as bar:
                ends = publish_files(publisher, todo, label_from_folder=opts.label_from_folder,
                                     progress=advance(bar)).offsets
        except StopRequested:
            echo("stopped before indexing; run `imgsearch up` on the same folders again")
            return False
        total = progress.total(ends)
        with tqdm(total=total, unit="img", desc="indexing", file=sys.stderr,
                  mininterval=0.5) as bar:
            while True:
                processed, finished = progress.done(ends)
                if processed > bar.n:
                    bar.update(processed - bar.n)
                if finished:
                    break
                if stopper.requested.wait(0.5) or not healthy():
                    bar.close()
                    echo(f"indexing interrupted after {processed} of {total} images; run "
                         "`imgsearch up` on the same folders again to finish")
                    return False
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    # Whatever is not stored as published now has failed; the dead letters say why.
    missing = new_or_changed(group.pipeline, components.store, todo,
                             label_from_folder=opts.label_from_folder,
                             max_bytes=settings.fetch_max_bytes)
    echo(f"indexed: {len(todo) - len(missing)} stored, {len(missing)} failed in "
         f"{elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.1f} img/s)")
    if len(todo) > len(missing):
        # The embedded engine builds its HNSW index only when asked, and holds the
        # interpreter while it does: searches wait for it, so say so.
        t0 = time.monotonic()
        echo("index:   building the search index (searches wait until it is done)")
        components.store.optimize()
        echo(f"index:   built in {time.monotonic() - t0:.1f}s")
    if missing:
        echo(f"{len(missing)} files could not be indexed (their events are in the "
             f"dead-letter topic {settings.kafka_dlq_topic!r}):")
        for failure in failure_reasons(settings, missing):
            echo(f"  {failure}")
    return True


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
"""


@click.command("up", epilog=UP_EPILOG)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@up_options
def up(paths: tuple[Path, ...], **options: Any) -> None:
    """Run the whole system in one process and index the images under PATHS.

    Starts a local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the embedded store,
    ingest workers, and the query API with its search page; publishes the new or changed
    images under PATHS and shows indexing progress. Ctrl-C stops everything cleanly.
    """
    sys.exit(run_up(UpOptions(paths=paths, **options)))
