"""Ingest throughput: the naive loop, the model's own ceiling, and the pipeline, side by side.

    python bench/ingest.py                                   # CPU, the default matrix
    python bench/ingest.py --dataset imagenet-sample --model resnet50 --device cuda \
        --batch-size 256 --limit 5000 --no-kafka             # one command on a GPU machine

For each dataset x model it measures, in one run:

1. naive     one image at a time: read, decode, preprocess, forward, upsert (the seeds' loop);
2. model     forward passes only, at the chosen batch size, on synthetic tensors: the ceiling;
3. files     the staged pipeline (shared/staged.py) fed straight from files, no Kafka;
4. kafka     events through a Kafka-protocol broker (Tansu, or KAFKA_BOOTSTRAP_SERVERS) into
             the ingest worker and the store, timed from the first event to the last commit.

It prints img/s, the ratios to the model ceiling and to the naive loop, and how busy each
stage was. Datasets come from IMGSEARCH_ASSETS (default ../shared); mobilenetv2_100 uses
its real weights, other models random weights (same compute).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgsearch.files import ImageFile, find_images  # noqa: E402
from shared.components import Components  # noqa: E402
from shared.config import Settings, load_settings  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.events import encode, parse_event, upload_event  # noqa: E402
from shared.images import decode_image  # noqa: E402
from shared.pipeline import WorkItem  # noqa: E402
from shared.staged import StagedPipeline  # noqa: E402
from shared.store.base import PointRecord  # noqa: E402

ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared"))


@dataclass
class Row:
    dataset: str
    model: str
    results: dict[str, float] = field(default_factory=dict)  # name -> img/s
    busy: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> stage -> s
    wall: dict[str, float] = field(default_factory=dict)


def settings_for(args: argparse.Namespace, model: str, store_dir: Path, roots: list[Path]) -> Settings:
    weights = ASSETS / "weights" / f"{model}.safetensors"
    return load_settings(
        model_name=model,
        model_weights=weights if weights.exists() else None,
        model_pretrained=weights.exists(),
        device=args.device,
        qdrant_path=store_dir,
        image_file_roots=roots,
        batch_size=args.batch_size,
        batch_max_wait_ms=50,
        worker_metrics_port=0,
        kafka_max_poll_interval_ms=10_000,
        kafka_session_timeout_ms=10_000,
        kafka_heartbeat_interval_ms=1_000,
    )


def bench_naive(embedder: Embedder, settings: Settings, files: list[ImageFile]) -> float:
    """The seeds' loop: one image at a time, every stage in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        components = Components.load(settings.model_copy(update={"qdrant_path": Path(tmp)}),
                                     embedder=embedder)
        try:
            started = time.perf_counter()
            for f in files:
                image = decode_image(f.path.read_bytes(), max_pixels=settings.image_max_pixels)
                vector = embedder.embed([embedder.preprocess(image)])[0]
                components.store.upsert([PointRecord(f.image_id, vector, {"image_id": f.image_id})])
            return len(files) / (time.perf_counter() - started)
        finally:
            components.close()


def bench_model(embedder: Embedder, batch_size: int, seconds: float) -> float:
    """Forward passes on synthetic tensors of the model's input size."""
    size = embedder.data_config["input_size"]
    batch = torch.randn(batch_size, *size)
    embedder.embed(batch)  # warm-up: allocations, kernels, autotuning
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed(batch)
        n += batch_size
    return n / (time.perf_counter() - started)


def bench_files(embedder: Embedder, settings: Settings, files: list[ImageFile]) -> tuple[float, dict[str, float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        components = Components.load(settings.model_copy(update={"qdrant_path": Path(tmp)}),
                                     embedder=embedder)
        pipeline = components.pipeline(skip_unchanged=False)
        failures: list[object] = []
        staged = StagedPipeline(
            pipeline, on_done=lambda r: failures.append(r) if r.outcome == "failed" else None,
            batch_size=settings.batch_size, max_wait_s=settings.batch_max_wait_ms / 1000,
            prepare_workers=settings.decode_workers,
        )
        try:
            started = time.perf_counter()
            for i, f in enumerate(files):
                event = parse_event(encode(upload_event(f.image_id, uri=f.path.as_uri()))[1])
                staged.submit(WorkItem(i, event))
                while staged.in_flight >= settings.batch_size * 4:
                    time.sleep(0.001)  # the same bound the worker keeps
            staged.wait_idle()
            wall = time.perf_counter() - started
        finally:
            staged.close()
            pipeline.close()
            components.close()
        if failures:
            raise RuntimeError(f"{len(failures)} images failed: {failures[:3]}")
        return len(files) / wall, dict(staged.busy_seconds), wall


def bench_kafka(embedder: Embedder, settings: Settings, files: list[ImageFile]) -> tuple[float, dict[str, float], float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", help="imagenet-sample, birds, or a folder (repeatable)")
    parser.add_argument("--model", action="append", help="timm model name (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=500, help="images per pipeline run")
    parser.add_argument("--naive-limit", type=int, default=100, help="images for the naive loop")
    parser.add_argument("--model-seconds", type=float, default=10.0)
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka run (e.g. on a GPU box)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = args.dataset or ["imagenet-sample", "birds"]
    models = args.model or ["mobilenetv2_100", "resnet50"]

    rows: list[Row] = []
    for dataset in datasets:
        root = Path(dataset) if Path(dataset).is_dir() else ASSETS / "data" / dataset
        files = list(find_images([root]))[: args.limit]
        if not files:
            raise SystemExit(f"no images under {root}; set IMGSEARCH_ASSETS")
        for model in models:
            with tempfile.TemporaryDirectory() as tmp:
                settings = settings_for(args, model, Path(tmp), [root.resolve()])
                embedder = Embedder.from_settings(settings)
                row = Row(dataset, model)
                print(f"[{dataset} / {model} on {embedder.device}, batch {args.batch_size}, "
                      f"{len(files)} images, {torch.get_num_threads()} threads]", flush=True)
                row.results["naive"] = bench_naive(embedder, settings, files[: args.naive_limit])
                row.results["model"] = bench_model(embedder, args.batch_size, args.model_seconds)
                rate, busy, wall = bench_files(embedder, settings, files)
                row.results["files"], row.busy["files"], row.wall["files"] = rate, busy, wall
                if not args.no_kafka:
                    rate, busy, wall = bench_kafka(embedder, settings, files)
                    row.results["kafka"], row.busy["kafka"], row.wall["kafka"] = rate, busy, wall
                rows.append(row)
                print("  " + "  ".join(f"{k} {v:.1f} img/s" for k, v in row.results.items()), flush=True)

    print()
    header = f"{'dataset':16} {'model':16} {'naive':>8} {'model':>8} {'files':>8} {'kafka':>8} {'kafka/model':>11} {'kafka/naive':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.results
        best = r.get("kafka", r["files"])
        print(f"{row.dataset:16} {row.model:16} {r['naive']:8.1f} {r['model']:8.1f} {r['files']:8.1f} "
              f"{r.get('kafka', float('nan')):8.1f} {best / r['model']:11.2f} {best / r['naive']:11.2f}")
    print("\nstage busy seconds (fetch and decode summed over threads) / wall seconds:")
    for row in rows:
        for name, busy in row.busy.items():
            stages = "  ".join(f"{k} {v:6.1f}" for k, v in busy.items())
            print(f"  {row.dataset:16} {row.model:16} {name:6} {stages}   wall {row.wall[name]:6.1f}")


if __name__ == "__main__":
    main()
