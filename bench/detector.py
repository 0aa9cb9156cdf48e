"""What optional YOLOv5 cropping costs, per engine: images per second with and without
the detector.

Side by side in one run, on the same photos (the first --n ImageNet-sample JPEGs, about
100 KB each), the same model (mobilenetv2_100, real weights) and the same batching
(--batch, BATCH_SIZE's default), through the ingest pipeline itself (shared/pipeline/:
decode -> [detect -> crop] -> preprocess -> embed -> upsert into an in-memory store; the
photos travel inline in the events, so nothing is fetched). Each engine (--engine, default
every installed one) runs both the embedder and the detector. Configurations alternate
round by round, and the table gives each one's median round, so a neighbour's load on a
shared machine hits them all alike.

    python bench/detector.py                   # 100 images, 3 rounds: a few minutes on 2 cores
    python bench/detector.py --n 50 --rounds 1 --sizes 640 --engine openvino
    python bench/detector.py --device cuda --n 500 --batch 128 --engine torch   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from qdrant_client import QdrantClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.detection import CropMode, Cropper, Detector  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.events import ImageUploaded  # noqa: E402
from shared.fetch import ImageFetcher  # noqa: E402
from shared.models.choice import ENGINES, installed  # noqa: E402
from shared.pipeline.scheduler import run_all  # noqa: E402
from shared.pipeline.stages import IngestPipeline, WorkItem  # noqa: E402
from shared.store.base import CollectionSpec  # noqa: E402
from shared.store.qdrant import QdrantStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared")).resolve()
MAX_PIXELS = 40_000_000  # IMAGE_MAX_PIXELS's default
STAGES = ("decode", "detect", "embed", "upsert")


@dataclass(frozen=True)
class Config:
    name: str
    detector: Detector | None
    embedder: Embedder
    mode: CropMode = "largest"


@dataclass
class Round:
    seconds: float
    points: int  # vectors stored: one per image, more with CROP_MODE=all
    stages: dict[str, float] = field(default_factory=dict)


def run_once(config: Config, payloads: Sequence[bytes], batch: int) -> Round:
    """Ingest ``payloads`` into a fresh in-memory collection, ``batch`` events at a time."""
    embedder = config.embedder
    spec = CollectionSpec("bench", embedder.dim, embedder.info.as_metadata())
    store = QdrantStore(QdrantClient(":memory:"), spec)
    fetcher = ImageFetcher()  # unused: the photos are inline
    pipeline = IngestPipeline(
        embedder, store, fetcher, max_pixels=MAX_PIXELS, embed_batch_size=batch,
        skip_unchanged=False, cropper=Cropper(config.detector, config.mode),
    )
    items = [WorkItem(n, ImageUploaded(f"e{n}", "bench", f"img-{n}", None, data))
             for n, data in enumerate(payloads)]
    stages = dict.fromkeys(STAGES, 0.0)
    try:
        start = time.perf_counter()
        report = run_all(pipeline, items, batch_size=batch, prepare_workers=2)
        if report.failures:
            raise SystemExit(f"ingest failed: {report.failures[0].error}")
        for stage in STAGES:
            stages[stage] += report.stage_seconds.get(stage, 0.0)
        seconds = time.perf_counter() - start
        points = int(store.client.count(spec.name, exact=True).count)
    finally:
        pipeline.close()
        store.close()
        fetcher.close()
    return Round(seconds, points, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="number of photos")
    parser.add_argument("--batch", type=int, default=32, help="batch size (BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="640,320", help="DETECTOR_IMG_SIZE values")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", action="append", choices=ENGINES,
                        help="engine for the embedder and detector (repeatable; default: all)")
    args = parser.parse_args()
    engines = args.engine or [e for e in ENGINES if installed(e)]

    sample = ASSETS / "data" / "imagenet-sample"
    paths = sorted(sample.glob("*.JPEG"))[: args.n]
    if not paths:
        sys.exit(f"no photos under {sample}: set IMGSEARCH_ASSETS to the folder holding data/")
    payloads = [p.read_bytes() for p in paths]
    weights = ASSETS / "weights" / "yolov5n.pt"
    configs = []
    for engine in engines:
        embedder = Embedder("mobilenetv2_100",
                            weights=ASSETS / "weights/mobilenetv2_100.safetensors",
                            device=args.device, engine=engine)
        configs.append(Config(f"{engine}: DETECTOR=none", None, embedder))
        for size in (int(s) for s in args.sizes.split(",") if s):
            detector = Detector(weights, device=embedder.device, img_size=size, engine=engine)
            configs.append(Config(f"{engine}: yolov5n {size} largest", detector, embedder,
                                  "largest"))
            if size == 640:
                configs.append(Config(f"{engine}: yolov5n {size} all", detector, embedder,
                                      "all"))

    print(f"{len(payloads)} ImageNet-sample JPEGs, batch {args.batch}, mobilenetv2_100, "
          f"device {args.device}, engines {', '.join(engines)}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}")
    for config in configs:  # warm-up: first-call allocations and kernel selection
        run_once(config, payloads[: args.batch], args.batch)
    rounds: dict[str, list[Round]] = {c.name: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            rounds[config.name].append(run_once(config, payloads, args.batch))
        print(f"  round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{name} {len(payloads) / rs[-1].seconds:.1f} img/s" for name, rs in rounds.items()))

    header = ["configuration", "img/s", "vs none", "points/img", "decode", "detect+crop",
              "embed", "upsert"]
    rows = []
    def median_round(rs: list[Round]) -> Round:
        return sorted(rs, key=lambda r: r.seconds)[(len(rs) - 1) // 2]

    for config in configs:
        rs = rounds[config.name]
        engine = config.name.split(":")[0]
        baseline = len(payloads) / median_round(rounds[f"{engine}: DETECTOR=none"]).seconds
        median = median_round(rs)
        rate = len(payloads) / median.seconds
        per_img = {k: f"{v / len(payloads) * 1000:.1f}ms" for k, v in median.stages.items()}
        rows.append([config.name, f"{rate:.1f}", f"{rate / baseline:.2f}x",
                     f"{median.points / len(payloads):.2f}", *per_img.values()])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print("\n(stage columns: median round's busy time per image, decode summed over the "
          "decode threads; detect+crop includes preprocessing the crops; img/s counts input "
          "photos)")


if __name__ == "__main__":
    main()
