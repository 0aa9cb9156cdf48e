"""What optional YOLOv5 cropping costs: images per second with and without the detector.

Side by side in one run, on the same photos (the first --n ImageNet-sample JPEGs, about
100 KB each), the same model (mobilenetv2_100, real weights) and the same batching
(--batch, BATCH_SIZE's default): bytes -> decode -> [detect -> crop] -> preprocess ->
embed. Configurations alternate round by round, and the table gives each one's median
round, so a neighbour's load on a shared machine hits them all alike.

    python bench/detector.py                   # 100 images, 3 rounds: a few minutes on 2 cores
    python bench/detector.py --n 50 --rounds 1 --sizes 640
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.detection import CropMode, Cropper, Detector  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.images import decode_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared")).resolve()
MAX_PIXELS = 40_000_000  # IMAGE_MAX_PIXELS's default


@dataclass(frozen=True)
class Config:
    name: str
    detector: Detector | None
    mode: CropMode = "largest"


@dataclass
class Round:
    seconds: float
    points: int  # vectors embedded: one per image, more with CROP_MODE=all
    stages: dict[str, float] = field(default_factory=dict)


def run_once(config: Config, payloads: Sequence[bytes], embedder: Embedder, batch: int) -> Round:
    cropper = Cropper(config.detector, config.mode)
    stages = dict.fromkeys(("decode", "detect+crop", "preprocess", "embed"), 0.0)
    points = 0
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        t0 = time.perf_counter()
        images = [decode_image(data, max_pixels=MAX_PIXELS) for data in payloads[i:i + batch]]
        t1 = time.perf_counter()
        crops = [c for per_image in cropper.crops_for(images) for c in per_image]
        t2 = time.perf_counter()
        tensors = [embedder.preprocess(c.image) for c in crops]  # type: ignore[arg-type]
        t3 = time.perf_counter()
        for j in range(0, len(tensors), batch):  # CROP_MODE=all may give more than a batch
            embedder.embed(tensors[j:j + batch])
        t4 = time.perf_counter()
        points += len(crops)
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[stage] += seconds
    return Round(time.perf_counter() - start, points, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="number of photos")
    parser.add_argument("--batch", type=int, default=32, help="batch size (BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="640,320", help="DETECTOR_IMG_SIZE values")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    sample = ASSETS / "data" / "imagenet-sample"
    paths = sorted(sample.glob("*.JPEG"))[: args.n]
    if not paths:
        sys.exit(f"no photos under {sample}: set IMGSEARCH_ASSETS to the folder holding data/")
    payloads = [p.read_bytes() for p in paths]
    embedder = Embedder("mobilenetv2_100", weights=ASSETS / "weights/mobilenetv2_100.safetensors",
                        device=args.device)
    weights = ASSETS / "weights" / "yolov5n.pt"
    configs = [Config("DETECTOR=none", None)]
    for size in (int(s) for s in args.sizes.split(",") if s):
        detector = Detector(weights, device=embedder.device, img_size=size)
        configs.append(Config(f"yolov5n {size} largest", detector, "largest"))
        if size == 640:
            configs.append(Config(f"yolov5n {size} all", detector, "all"))

    print(f"{len(payloads)} ImageNet-sample JPEGs, batch {args.batch}, mobilenetv2_100, "
          f"device {embedder.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    for config in configs:  # warm-up: first-call allocations and kernel selection
        run_once(config, payloads[: args.batch], embedder, args.batch)
    rounds: dict[str, list[Round]] = {c.name: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            rounds[config.name].append(run_once(config, payloads, embedder, args.batch))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {len(payloads) / rs[-1].seconds:.1f} img/s" for name, rs in rounds.items()))

    baseline = len(payloads) / statistics.median(r.seconds for r in rounds[configs[0].name])
    header = ["configuration", "img/s", "vs none", "points/img", "decode", "detect+crop",
              "preprocess", "embed"]
    rows = []
    for name, rs in rounds.items():
        median = sorted(rs, key=lambda r: r.seconds)[len(rs) // 2]
        rate = len(payloads) / median.seconds
        per_img = {k: f"{v / len(payloads) * 1000:.1f}ms" for k, v in median.stages.items()}
        rows.append([name, f"{rate:.1f}", f"{rate / baseline:.2f}x",
                     f"{median.points / len(payloads):.2f}", *per_img.values()])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print("\n(stage columns: median round's time per image; img/s counts input photos)")


if __name__ == "__main__":
    main()
