"""JPEG decode for the model: full size against the DCT-scaled decode the product uses,
in time and in what the model sees.

    python bench/decode.py                 # 100 phone photos + 300 ImageNet-sample photos
    python bench/decode.py --phone 200 --sample 500

For phone photos (4032 x 3024, q90, made from the shared photos by bench/phone_photos.py)
and the ImageNet sample as it is, on one thread, per photo:

* time of: Pillow full decode + the model's preprocessing; Pillow scaled decode
  (shared/images.py, ``DecodeNeed`` of the model) + preprocessing; and, when installed,
  simplejpeg (libjpeg-turbo) full and scaled, for comparison;
* the cosine between the model's vectors (mobilenetv2_100, real weights) of the scaled and
  the full decode: its minimum, 1st percentile and median.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.phone_photos import make_phone_photos  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.images import decode  # noqa: E402

ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared"))


def timed(fn, datas: list[bytes]) -> tuple[float, list]:  # type: ignore[no-untyped-def]
    out, started = [], time.perf_counter()
    for data in datas:
        out.append(fn(data))
    return (time.perf_counter() - started) / len(datas) * 1000, out


def measure(name: str, datas: list[bytes], embedder: Embedder) -> None:
    need = embedder.decode_need
    full_ms, full = timed(lambda d: embedder.preprocess(decode(d, max_pixels=10**9).image), datas)
    scaled_ms, scaled = timed(
        lambda d: embedder.preprocess(decode(d, max_pixels=10**9, need=need).image), datas)
    line = (f"{name:16} {len(datas):4d} photos, {np.mean([len(d) for d in datas]) / 1e6:5.2f} MB: "
            f"Pillow full+preprocess {full_ms:6.1f} ms, scaled+preprocess {scaled_ms:6.1f} ms")
    if importlib.util.find_spec("simplejpeg"):
        import simplejpeg

        def sj_scaled(data: bytes) -> np.ndarray:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            denominator = need.scale_for((width, height))
            return simplejpeg.decode_jpeg(data, min_height=-(-height // denominator),
                                          min_width=-(-width // denominator))

        sj_full_ms, _ = timed(simplejpeg.decode_jpeg, datas)
        sj_scaled_ms, _ = timed(sj_scaled, datas)
        pil_full_ms, _ = timed(lambda d: decode(d, max_pixels=10**9), datas)
        pil_scaled_ms, _ = timed(lambda d: decode(d, max_pixels=10**9, need=need), datas)
        line += (f"; decode only: Pillow {pil_full_ms:.1f} / {pil_scaled_ms:.1f} ms, "
                 f"simplejpeg {sj_full_ms:.1f} / {sj_scaled_ms:.1f} ms (full / scaled)")
    vectors = [embedder.embed([a, b]) for a, b in zip(full, scaled, strict=True)]
    cosines = np.array([float(v[0] @ v[1]) for v in vectors])
    print(line, flush=True)
    print(f"{'':16} cosine scaled vs full: min {cosines.min():.4f}, 1st percentile "
          f"{np.percentile(cosines, 1):.4f}, median {statistics.median(cosines):.4f}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phone", type=int, default=100)
    parser.add_argument("--sample", type=int, default=300)
    args = parser.parse_args()
    embedder = Embedder("mobilenetv2_100", weights=ASSETS / "weights/mobilenetv2_100.safetensors",
                        device="cpu", engine="torch", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        phones = make_phone_photos(ASSETS, Path(tmp), args.phone)
        measure("phone 4032x3024", [p.read_bytes() for p in phones], embedder)
    sample = sorted((ASSETS / "data" / "imagenet-sample").glob("*.JPEG"))[: args.sample]
    measure("imagenet-sample", [p.read_bytes() for p in sample], embedder)


if __name__ == "__main__":
    main()
