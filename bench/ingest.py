"""Ingest throughput per engine: the naive loop, the engine's model-only ceiling, and the
pipeline, side by side in one run.

    python bench/ingest.py                       # CPU: phone + imagenet-sample, every engine
    python bench/ingest.py --dataset phone --engine openvino --engine torch --rounds 3
    python bench/ingest.py --dataset imagenet-sample --model resnet50 --device cuda \
        --engine torch --batch-size 256 --limit 5000 --no-kafka   # on a GPU machine

For each dataset x model it measures, per round and per engine (engines alternate within
a round, so load on a shared machine hits them alike):

1. naive     the seeds' loop, once per round (it does not depend on the engine): read,
             full-size decode, timm's transform, PyTorch eager at batch 1, upsert;
2. model     the engine's forward passes only, at the batch size, on synthetic inputs;
3. files     the ingest scheduler (shared/pipeline/scheduler.py) fed from files, no Kafka:
             what `imgsearch index` runs, with the product's defaults (scaled decode,
             DECODE_WORKERS, the engine's thread rule);
4. index     `imgsearch index FOLDER` itself, in a fresh process (--index-cli): its own
             "indexed N files in X s" line, which excludes loading the model;
5. kafka     events through a Kafka-protocol broker (Tansu, or KAFKA_BOOTSTRAP_SERVERS)
             into the ingest worker and the store, from the first event to the last commit.

Datasets: ``phone`` (200 JPEGs of 4032 x 3024 at q90, 3.2 MB, made deterministically from
the shared photos into a temporary folder by bench/phone_photos.py), ``phone-smooth`` (the
same without grain, 1.3 MB), ``imagenet-sample``, ``birds``, or a folder.
mobilenetv2_100 uses its real weights; other models random weights (same compute). It
prints each round, then the median round per engine, the ratios the targets in
docs/engines.md are stated in, and the load average beside every figure.

On a machine shared with other work, wall-clock rates move with the neighbours' load, so
it also reports the CPU time this process spent per image (user + system, all threads;
the broker's own process is not counted): the work each way costs, whoever else runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.phone_photos import make_phone_photos  # noqa: E402
from imgsearch.files import ImageFile, find_images  # noqa: E402
from shared.components import Components  # noqa: E402
from shared.config import Settings, load_settings  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.events import encode, parse_event, upload_event  # noqa: E402
from shared.images import decode_image  # noqa: E402
from shared.models.choice import ENGINES, installed  # noqa: E402
from shared.pipeline.stages import WorkItem  # noqa: E402
from shared.store.base import PointRecord  # noqa: E402

ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared"))
STAGES = ("fetch", "decode", "embed", "upsert")


@dataclass
class Row:
    dataset: str
    model: str
    engine: str
    rates: dict[str, list[float]] = field(default_factory=dict)  # measure -> per round img/s
    cpu: dict[str, list[float]] = field(default_factory=dict)  # measure -> CPU ms per image
    loads: dict[str, list[float]] = field(default_factory=dict)  # measure -> 1-min load
    busy: dict[str, dict[str, float]] = field(default_factory=dict)  # last round's stages
    wall: dict[str, float] = field(default_factory=dict)

    def add(self, measure: str, rate: float, cpu_ms: float | None = None) -> None:
        self.rates.setdefault(measure, []).append(rate)
        if cpu_ms is not None:
            self.cpu.setdefault(measure, []).append(cpu_ms)
        self.loads.setdefault(measure, []).append(os.getloadavg()[0])

    def median(self, measure: str) -> float:
        values = self.rates.get(measure)
        return statistics.median(values) if values else float("nan")

    def cpu_median(self, measure: str) -> float:
        values = self.cpu.get(measure)
        return statistics.median(values) if values else float("nan")


class CpuClock:
    """CPU time (user + system, every thread) this process spends in a block."""

    def __enter__(self) -> CpuClock:
        self.started = os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        ended = os.times()
        self.seconds = (ended.user - self.started.user) + (ended.system - self.started.system)

    def per_image_ms(self, images: int) -> float:
        return self.seconds / images * 1000


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def settings_for(args: argparse.Namespace, model: str, engine: str, store_dir: Path,
                 roots: list[Path]) -> Settings:
    weights = ASSETS / "weights" / f"{model}.safetensors"
    extra = {}
    if args.engine_threads is not None:
        extra["engine_threads"] = args.engine_threads
    if args.decode_workers is not None:
        extra["decode_workers"] = args.decode_workers
    return load_settings(
        model_name=model,
        model_weights=weights if weights.exists() else None,
        model_pretrained=weights.exists(),
        device=args.device,
        embed_engine=engine,
        qdrant_path=store_dir,
        image_file_roots=roots,
        batch_size=args.batch_size,
        batch_max_wait_ms=50,
        worker_metrics_port=0,
        kafka_max_poll_interval_ms=10_000,
        kafka_session_timeout_ms=10_000,
        kafka_heartbeat_interval_ms=1_000,
        **extra,
    )


def bench_naive(embedder: Embedder, settings: Settings, files: list[ImageFile]) -> float:
    """The seeds' loop: one image at a time, every stage in turn, full-size decode,
    timm's own transform, PyTorch eager at batch 1 (``embedder`` must be the torch one)."""
    assert embedder.engine == "torch"
    with tempfile.TemporaryDirectory() as tmp:
        components = Components.load(settings.model_copy(update={"qdrant_path": Path(tmp)}),
                                     embedder=embedder)
        try:
            started = time.perf_counter()
            for f in files:
                image = decode_image(f.path.read_bytes(), max_pixels=settings.image_max_pixels)
                vector = embedder.embed([embedder.transform.transform(image)])[0]
                components.store.upsert([PointRecord(f.image_id, vector, {"image_id": f.image_id})])
            return len(files) / (time.perf_counter() - started)
        finally:
            components.close()


def bench_model(embedder: Embedder, batch_size: int, seconds: float) -> float:
    """Forward passes on synthetic inputs of the model's input size."""
    batch = np.random.default_rng(0).standard_normal(
        (batch_size, *embedder.input_size)).astype(np.float32)
    embedder.embed(batch)  # warm-up: allocations, kernels, autotuning
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed(batch)
        n += batch_size
    return n / (time.perf_counter() - started)


def bench_files(embedder: Embedder, settings: Settings,
                files: list[ImageFile]) -> tuple[float, dict[str, float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        components = Components.load(settings.model_copy(update={"qdrant_path": Path(tmp)}),
                                     embedder=embedder)
        items = [WorkItem(i, parse_event(encode(upload_event(f.image_id, uri=f.path.as_uri()))[1]))
                 for i, f in enumerate(files)]
        try:
            # The scheduler every entrance uses, fed straight from files (no Kafka).
            report = components.ingest(items, skip_unchanged=False)
        finally:
            components.close()
        if report.failures:
            raise RuntimeError(f"{len(report.failures)} images failed: {report.failures[:3]}")
        return len(files) / report.wall_seconds, report.stage_seconds, report.wall_seconds


def bench_index_cli(args: argparse.Namespace, model: str, engine: str, folder: Path,
                    count: int) -> float:
    """`imgsearch index FOLDER` in a fresh process, as a user runs it; its own timing."""
    weights = ASSETS / "weights" / f"{model}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "EMBED_ENGINE": engine, "DEVICE": args.device,
               "QDRANT_PATH": str(Path(tmp) / "data"), "MODEL_NAME": model,
               "BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "WARNING"}
        if weights.exists():
            env["MODEL_WEIGHTS"] = str(weights)
        else:
            env["MODEL_PRETRAINED"] = "false"
        if args.engine_threads is not None:
            env["ENGINE_THREADS"] = str(args.engine_threads)
        if args.decode_workers is not None:
            env["DECODE_WORKERS"] = str(args.decode_workers)
        run = subprocess.run([sys.executable, "-c", "from imgsearch.cli import main; main()",
                              "index", str(folder)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=3600)
    found = re.search(r"indexed (\d+) files in ([\d.]+)s", run.stdout + run.stderr)
    if run.returncode != 0 or not found:
        raise RuntimeError(f"imgsearch index failed: {run.stderr[-2000:]}")
    return int(found.group(1)) / float(found.group(2))


def bench_kafka(embedder: Embedder, settings: Settings,
                files: list[ImageFile]) -> tuple[float, dict[str, float], float]:
    from kafka import KafkaAdminClient

    from imgsearch.local_broker import LocalBroker
    from imgsearch.publish import publish_files
    from ingest_worker.service import WorkerGroup
    from shared.kafka import EventPublisher, ensure_topics

    broker = None
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker = LocalBroker()
        broker.start()
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap})
    suffix = os.urandom(4).hex()
    settings = settings.model_copy(update={"kafka_topic": f"bench-{suffix}",
                                           "kafka_dlq_topic": f"bench-{suffix}.dlq",
                                           "kafka_group_id": f"bench-{suffix}"})
    try:
        ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic], partitions=4)
        with tempfile.TemporaryDirectory() as tmp:
            components = Components.load(settings.model_copy(update={"qdrant_path": Path(tmp)}),
                                         embedder=embedder)
            group = WorkerGroup(components, count=1)
            group.start()
            worker = group.workers[0]
            while len(worker.assignment) < 4:  # time the work, not the group join
                time.sleep(0.05)
            publisher = EventPublisher(settings)
            started = time.perf_counter()
            result = publish_files(publisher, files)
            publisher.close()
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
            try:
                while True:
                    offsets = admin.list_group_offsets(settings.kafka_group_id).get(
                        settings.kafka_group_id, {})
                    have = {tp.partition: om.offset for tp, om in offsets.items()}
                    if all(have.get(p, 0) >= o for p, o in result.offsets.items()):
                        break
                    if not group.alive:
                        raise RuntimeError(f"workers stopped: {group.errors}")
                    time.sleep(0.05)
            finally:
                admin.close()
            wall = time.perf_counter() - started
            busy = worker.busy_seconds
            group.close()
            components.close()
        return len(files) / wall, busy, wall
    finally:
        if broker is not None:
            broker.stop()


def dataset_files(name: str, limit: int, tmp: Path) -> tuple[Path, list[ImageFile]]:
    if name in ("phone", "phone-smooth"):
        root = tmp / name
        started = time.perf_counter()
        grain = {"grain": 0} if name == "phone-smooth" else {}
        make_phone_photos(ASSETS, root, limit, **grain)
        size = sum(p.stat().st_size for p in root.glob("*.jpg")) / max(1, limit)
        print(f"[made {limit} phone photos (4032x3024, q90, {size / 1e6:.1f} MB each) in "
              f"{time.perf_counter() - started:.0f}s]", flush=True)
    else:
        root = Path(name) if Path(name).is_dir() else ASSETS / "data" / name
    files = list(find_images([root]))[:limit]
    if not files:
        raise SystemExit(f"no images under {root}; set IMGSEARCH_ASSETS")
    return root, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append",
                        help="phone, phone-smooth, imagenet-sample, birds, or a folder "
                        "(repeatable)")
    parser.add_argument("--model", action="append", help="timm model name (repeatable)")
    parser.add_argument("--engine", action="append", choices=[*ENGINES, "auto"],
                        help="engine (repeatable; default: every installed one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=200, help="images per pipeline run")
    parser.add_argument("--naive-limit", type=int, default=60, help="images for the naive loop")
    parser.add_argument("--model-seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--engine-threads", type=int, help="ENGINE_THREADS (default: the rule)")
    parser.add_argument("--decode-workers", type=int, help="DECODE_WORKERS (default: cores)")
    parser.add_argument("--index-cli", action="store_true",
                        help="also time `imgsearch index` in a fresh process")
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = args.dataset or ["phone", "imagenet-sample"]
    models = args.model or ["mobilenetv2_100"]
    engines = args.engine or [e for e in ENGINES if installed(e)]

    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    for dataset in datasets:
        root, files = dataset_files(dataset, args.limit, tmp)
        for model in models:
            built = {}
            for engine in dict.fromkeys(["torch", *engines]):
                settings = settings_for(args, model, engine, tmp / "store", [root.resolve()])
                built[engine] = (Embedder.from_settings(settings), settings)
            torch_embedder, torch_settings = built["torch"]
            naive = Row(dataset, model, "naive")
            by_engine = {e: Row(dataset, model, e) for e in engines}
            rows += [naive, *by_engine.values()]
            print(f"[{dataset} / {model}, batch {args.batch_size}, {len(files)} images, "
                  f"{os.cpu_count()} CPUs; engines: " + "; ".join(
                      f"{e}: {built[e][0].describe()}" for e in engines) + "]", flush=True)
            naive_files = files[: args.naive_limit]
            for r in range(args.rounds):
                with CpuClock() as clock:
                    rate = bench_naive(torch_embedder, torch_settings, naive_files)
                naive.add("naive", rate, clock.per_image_ms(len(naive_files)))
                line = [f"naive {naive.rates['naive'][-1]:.1f} ({load()})"]
                for engine in engines:
                    embedder, settings = built[engine]
                    row = by_engine[engine]
                    row.add("model", bench_model(embedder, args.batch_size, args.model_seconds))
                    with CpuClock() as clock:
                        rate, busy, wall = bench_files(embedder, settings, files)
                    row.add("files", rate, clock.per_image_ms(len(files)))
                    row.busy["files"], row.wall["files"] = busy, wall
                    if args.index_cli:
                        row.add("index", bench_index_cli(args, model, engine, root, len(files)))
                    if not args.no_kafka:
                        with CpuClock() as clock:
                            rate, busy, wall = bench_kafka(embedder, settings, files)
                        row.add("kafka", rate, clock.per_image_ms(len(files)))
                        row.busy["kafka"], row.wall["kafka"] = busy, wall
                    line.append(f"{engine}: " + " ".join(
                        f"{k} {v[-1]:.1f}" for k, v in row.rates.items()) + f" ({load()})")
                print(f"  round {r + 1}/{args.rounds}: " + " | ".join(line), flush=True)
            for embedder, _ in built.values():
                embedder.close()

    print(f"\nmedian of {args.rounds} round(s), img/s; (load: 1-minute load average when "
          f"each figure was taken, median; {os.cpu_count()} CPUs)")
    header = (f"{'dataset':16} {'model':16} {'engine':12} {'naive':>7} {'model':>7} "
              f"{'files':>7} {'index':>7} {'kafka':>7} {'files/naive':>11} "
              f"{'kafka/naive':>11} {'files/model':>11} {'kafka/model':>11}  load")
    print(header)
    print("-" * len(header))
    naive_of = {(r.dataset, r.model): r.median("naive") for r in rows if r.engine == "naive"}
    for row in rows:
        if row.engine == "naive":
            continue
        n, m = naive_of[(row.dataset, row.model)], row.median("model")
        f, i, k = row.median("files"), row.median("index"), row.median("kafka")
        loads = [x for v in row.loads.values() for x in v]
        print(f"{row.dataset:16} {row.model:16} {row.engine:12} {n:7.1f} {m:7.1f} {f:7.1f} "
              f"{i:7.1f} {k:7.1f} {f / n:11.2f} {k / n:11.2f} {f / m:11.2f} {k / m:11.2f}"
              f"  {statistics.median(loads):.1f}")
    print("\nCPU time of this process per image, ms (median round; the work each way costs):")
    naive_cpu = {(r.dataset, r.model): r.cpu_median("naive") for r in rows if r.engine == "naive"}
    for row in rows:
        work = naive_cpu[(row.dataset, row.model)] / row.cpu_median("files")
        ratio = "" if row.engine == "naive" else f"   naive / files {work:.2f}x"
        print(f"  {row.dataset:16} {row.engine:12} " + "  ".join(
            f"{k} {row.cpu_median(k):6.1f}" for k in row.cpu) + ratio)
    print("\nstage busy seconds of the last round (fetch and decode summed over threads) / wall:")
    for row in rows:
        for name, busy in row.busy.items():
            stages = "  ".join(f"{k} {v:6.1f}" for k, v in busy.items())
            print(f"  {row.dataset:16} {row.engine:12} {name:6} {stages}   wall "
                  f"{row.wall[name]:6.1f}")
    print(f"\ntorch {torch.__version__}; {load()} at the end")


if __name__ == "__main__":
    main()
