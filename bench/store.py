"""Embedded store benchmark: Qdrant Edge (EdgeStore) vs qdrant-client local mode (QdrantStore).

Both behind the project's VectorStore interface, in one run, on the same vectors:
random unit vectors (default 100k x 1280, mobilenetv2_100's width; --clusters N for
vectors with structure, like real embeddings) with payloads shaped like the real ones. Reports the upsert rate, Edge's optimize() time (HNSW build), query
latency p50/p99, and recall@10 against exact brute force. Queries are stored vectors
plus noise, so each has a well-defined nearest neighbour.

qdrant-client's local mode searches by brute force in numpy (~0.7 s per query at
50k x 2048), so it gets fewer queries. It also commits every point to SQLite on its
own: on a disk that is one fsync per point, hours for 100k. So its upsert rate on disk
is measured on a sample (--local-disk-sample), and the full collection it is queried at
lives on a RAM disk (/dev/shm) unless --local-dir says otherwise. --skip-local skips it.

    python bench/store.py                      # 100k x 1280: a few minutes on 2 cores
    python bench/store.py --n 20000 --local-queries 50
    python bench/store.py --n 1000000 --dim 320 --clusters 1000 --skip-local \
        --json docs/scaling-store.json      # capacity inputs (docs/scaling.md)

After optimize() it also measures what each point costs on disk, by kind of file (the
float32 vectors, the quantized copy, the HNSW links, payload and its index, the id
tracker): the memory figures of the capacity model (bench/capacity.py). --m and
--ef-construct set the HNSW graph (QDRANT_HNSW_M / QDRANT_HNSW_EF_CONSTRUCT).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.store.base import (  # after sys.path
    CollectionLayout,
    CollectionSpec,
    PointRecord,
    VectorStore,
)

SPEC_MODEL = {"model_name": "bench-random", "preprocessing": {}}


@dataclass
class Result:
    name: str
    upsert_s: float
    n: int
    optimize_s: float | None
    latencies_ms: list[float]
    recall: float | None
    top1: float | None
    where: str = ""
    bytes_per_point: dict[str, float] | None = None

    def figures(self) -> dict[str, object]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else None
        return {
            "upsert_per_s": round(self.n / self.upsert_s, 1),
            "optimize_s": None if self.optimize_s is None else round(self.optimize_s, 1),
            "queries": 0 if lat is None else len(lat),
            "p50_ms": None if lat is None else round(float(np.percentile(lat, 50)), 3),
            "p99_ms": None if lat is None else round(float(np.percentile(lat, 99)), 3),
            "recall_at_10": None if self.recall is None else round(self.recall, 4),
            "top1": None if self.top1 is None else round(self.top1, 4),
            "bytes_per_point": self.bytes_per_point,
        }

    def row(self) -> list[str]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else None
        return [
            self.name,
            f"{self.n / self.upsert_s:,.0f}",
            f"{self.upsert_s:.1f}",
            "-" if self.optimize_s is None else f"{self.optimize_s:.1f}",
            "-" if lat is None else f"{len(lat)}",
            "-" if lat is None else f"{np.percentile(lat, 50):.2f}",
            "-" if lat is None else f"{np.percentile(lat, 99):.2f}",
            "-" if self.recall is None else f"{self.recall:.3f}",
            "-" if self.top1 is None else f"{self.top1:.3f}",
            self.where,
        ]


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def clustered_vectors(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (cosine ~0.5 to their centre): closer to real
    embeddings than uniform random ones, in which every top-10 is a near tie that no
    approximate index can rank (recall@10 then understates HNSW)."""
    centres = unit_vectors(rng, clusters, dim)
    v = centres[rng.integers(0, clusters, n)] + unit_vectors(rng, n, dim)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def payload(i: int) -> dict[str, object]:
    return {
        "image_id": f"gallery/class_{i % 100:03d}/{i:07d}.jpg",
        "uri": f"file:///data/gallery/class_{i % 100:03d}/{i:07d}.jpg",
        "metadata": {"label": f"class_{i % 100:03d}"},
        "model": "bench-random",
        "sha256": f"{i:064x}",
        "event_id": f"00000000-0000-4000-8000-{i:012x}",
        "ingested_at": "2026-11-20T00:00:00+00:00",
    }


def fill(store: VectorStore, vectors: np.ndarray, batch: int, label: str) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        chunk = vectors[start : start + batch]
        store.upsert([PointRecord(str(payload(start + j)["image_id"]), v, payload(start + j))
                      for j, v in enumerate(chunk)])
        done = start + len(chunk)
        if done % (batch * 20) == 0 or done == len(vectors):
            rate = done / (time.perf_counter() - started)
            print(f"  {label}: {done:,}/{len(vectors):,} upserted ({rate:,.0f}/s)",
                  file=sys.stderr, flush=True)
    return time.perf_counter() - started


def query(store: VectorStore, queries: np.ndarray, truth: np.ndarray,
          k: int = 10) -> tuple[list[float], float | None, float | None]:
    """Latencies (ms), recall@k against exact search, and how often the exact first
    neighbour (the vector the query was made from) came first."""
    latencies = []
    found = 0
    first = 0
    for q, want in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        hits = store.search(q, limit=k)
        latencies.append((time.perf_counter() - t0) * 1000)
        ids = {h.image_id for h in hits}
        found += sum(1 for i in want if payload(int(i))["image_id"] in ids)
        first += bool(hits) and hits[0].image_id == payload(int(want[0]))["image_id"]
    if not len(queries):
        return [], None, None
    return latencies, found / (len(queries) * k), first / len(queries)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    # In slices of queries, with a partial sort: a full argsort of 500 x 1M scores would
    # need 4 GB of indices and most of a minute.
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 32):
        scores = queries[start : start + 32] @ vectors.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + 32] = np.take_along_axis(part, order, axis=1)
    return out


# Files of an optimised Qdrant segment, by what they hold (Qdrant Edge's layout, the
# server's too: the same Rust segment code).
_KINDS = {"vector_storage": "vectors", "vector_index": "hnsw", "payload_storage": "payload",
          "payload_index": "payload_index"}


def bytes_per_point(shard: Path, points: int) -> dict[str, float]:
    """Bytes on disk per stored point, by kind, in the optimised (HNSW-indexed) segments.

    The appendable segments that took the writes keep their preallocated 32 MiB chunks
    after optimize() moved the points out, so they are left out: they are a fixed cost per
    segment, not per point. Quantized copies live beside the vectors (``quantized*``
    files); the payload store grows in 32 MiB pages, so small collections overstate it."""
    sizes: dict[str, int] = {}
    indexed = [seg for seg in shard.glob("segments/*")
               if (seg / "vector_index" / "hnsw_config.json").exists()]
    for path in (f for seg in indexed for f in seg.glob("**/*")):
        if not path.is_file():
            continue
        parts = path.relative_to(shard).parts
        kind = "id_tracker" if parts[2].startswith("id_tracker") else _KINDS.get(parts[2], "other")
        if kind == "vectors" and path.name.startswith("quantized"):
            kind = "quantized"
        sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return {k: round(v / points, 1) for k, v in sorted(sizes.items())}


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_edge(root: Path, spec: CollectionSpec, vectors: np.ndarray, queries: np.ndarray,
               truth: np.ndarray, batch: int, unoptimized_queries: int) -> list[Result]:
    from shared.store.edge import EdgeStore

    store = EdgeStore(root, spec)
    try:
        upsert_s = fill(store, vectors, batch, "edge")
        pre = query(store, queries[:unoptimized_queries], truth[:unoptimized_queries])
        optimize_s = timed(store.optimize)
        print(f"  edge: optimize() took {optimize_s:.1f}s", file=sys.stderr, flush=True)
        post = query(store, queries, truth)
        assert store.count() == len(vectors)
        sizes = bytes_per_point(root / spec.name / "shard", len(vectors))
        print(f"  edge: bytes per point {sizes}", file=sys.stderr, flush=True)
    finally:
        store.close()
    # Reopening shows what a restart costs (segments and HNSW load from disk).
    reopen_s = timed(lambda: EdgeStore(root, spec).close())
    print(f"  edge: reopen + close took {reopen_s:.1f}s", file=sys.stderr, flush=True)
    where = f"{_fs(root)}, flush per batch"
    return [
        Result("Edge, before optimize()", upsert_s, len(vectors), None, *pre, where=where),
        Result("Edge, after optimize()", upsert_s, len(vectors), optimize_s, *post, where=where,
               bytes_per_point=sizes),
    ]


def bench_local(disk_root: Path, full_root: Path, spec: CollectionSpec, vectors: np.ndarray,
                queries: np.ndarray, truth: np.ndarray, batch: int,
                disk_sample: int) -> list[Result]:
    from qdrant_client import QdrantClient

    from shared.store.qdrant import QdrantStore

    results = []
    if disk_sample:
        sample = vectors[:disk_sample]
        store = QdrantStore(QdrantClient(path=str(disk_root)), spec)
        try:
            sample_s = fill(store, sample, batch, f"local on {_fs(disk_root)} (sample)")
        finally:
            store.close()
        results.append(Result("local mode, upsert sample", sample_s, len(sample), None, [],
                              None, None, where=_fs(disk_root)))
    store = QdrantStore(QdrantClient(path=str(full_root)), spec)
    try:
        upsert_s = fill(store, vectors, batch, f"local on {_fs(full_root)}")
        found = query(store, queries, truth)
        assert store.count() == len(vectors)
    finally:
        store.close()
    results.append(Result("local mode", upsert_s, len(vectors), None, *found,
                          where=_fs(full_root)))
    return results


def _fs(path: Path) -> str:
    """The filesystem type under ``path`` (tmpfs, ext4, overlay...), from /proc/mounts."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=["", "?"])
    return best[1]


def table(rows: list[list[str]]) -> str:
    header = ["store", "upsert/s", "upsert s", "optimize s", "queries", "p50 ms", "p99 ms",
              "recall@10", "top-1", "storage"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=512, help="points per upsert")
    parser.add_argument("--queries", type=int, default=500, help="Edge queries after optimize")
    parser.add_argument("--unoptimized-queries", type=int, default=50,
                        help="Edge queries before optimize (plain segments)")
    parser.add_argument("--local-queries", type=int, default=20)
    parser.add_argument("--local-disk-sample", type=int, default=2000,
                        help="points for local mode's upsert rate on --dir's disk (0: skip)")
    parser.add_argument("--local-dir", type=Path,
                        help="where local mode's full collection lives (default /dev/shm)")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="query = stored vector + this much noise, renormalised")
    parser.add_argument("--clusters", type=int, default=0,
                        help="draw vectors around this many centres (0: uniform random)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, help="where Edge's store goes (default: temp dir)")
    parser.add_argument("--m", type=int, help="HNSW links per node (Qdrant's default 16)")
    parser.add_argument("--ef-construct", type=int, help="HNSW build beam (default 100)")
    parser.add_argument("--quantization", choices=["none", "int8", "binary"], default="none")
    parser.add_argument("--json", type=Path,
                        help="add this run's Edge figures to a JSON file (a list of runs)")
    parser.add_argument("--note", default="", help="stored with --json (e.g. machine load)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    print(f"generating {args.n:,} x {args.dim} unit vectors", file=sys.stderr, flush=True)
    vectors = (clustered_vectors(rng, args.n, args.dim, args.clusters) if args.clusters
               else unit_vectors(rng, args.n, args.dim))
    picks = rng.choice(args.n, size=max(args.queries, args.local_queries), replace=False)
    queries = vectors[picks] + args.noise * unit_vectors(rng, len(picks), args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = exact_top_k(vectors, queries)
    layout = CollectionLayout(hnsw_m=args.m, hnsw_ef_construct=args.ef_construct)
    spec = CollectionSpec(name="bench", dim=args.dim, model=SPEC_MODEL,
                          quantization=args.quantization, layout=layout)
    shm = Path("/dev/shm")
    local_dir = args.local_dir or (shm if shm.is_dir() else args.dir)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-store-", dir=local_dir) as local_tmp:
        results = bench_edge(Path(tmp) / "edge", spec, vectors, queries[: args.queries],
                             truth[: args.queries], args.batch, args.unoptimized_queries)
        if not args.skip_local:
            results += bench_local(Path(tmp) / "local-sample", Path(local_tmp) / "local", spec,
                                   vectors, queries[: args.local_queries],
                                   truth[: args.local_queries], args.batch,
                                   args.local_disk_sample)

    print()
    kind = f"clustered ({args.clusters} centres)" if args.clusters else "random"
    print(f"{args.n:,} x {args.dim}-d {kind} unit vectors, cosine, {args.batch} points per "
          f"upsert, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), queries = "
          f"a stored vector + noise {args.noise}, k=10; {time.perf_counter() - started:.0f}s")
    print(table([r.row() for r in results]))
    edge = results[1]
    print(f"\nEdge bytes per point after optimize(): {edge.bytes_per_point}")
    if args.json:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        runs.append({
            "date": datetime.date.today().isoformat(), "n": args.n, "dim": args.dim,
            "vectors": kind, "hnsw_m": args.m or 16, "hnsw_ef_construct": args.ef_construct or 100,
            "quantization": args.quantization, "batch": args.batch, "cpus": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 1), "note": args.note,
            "seconds": round(time.perf_counter() - started),
            "edge": edge.figures(),
        })
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"added to {args.json}")
    local = [r for r in results if r.name == "local mode"]
    if local and local[0].latencies_ms:
        local_p50 = float(np.percentile(local[0].latencies_ms, 50))
        edge_p50 = float(np.percentile(edge.latencies_ms, 50))
        print(f"\nquery p50, local mode / Edge after optimize(): {local_p50 / edge_p50:,.0f}x")


if __name__ == "__main__":
    main()
