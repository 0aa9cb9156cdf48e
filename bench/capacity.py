"""Capacity model: how many workers, API replicas and Qdrant nodes a load needs, and
how much memory and disk they need, from figures this project measured.

    python bench/capacity.py --images 50e6 --uploads-per-s 500 --qps 200 --p99-ms 150
    python bench/capacity.py --images 50e6 --uploads-per-s 500 --qps 200 --p99-ms 150 \\
        --variant pca:320+int8 --on-disk-vectors --node-memory-gib 64
    python bench/capacity.py ... --worker-img-per-s 260     # your engine's measured rate
    python bench/capacity.py --measured                      # the inputs it works from

Measured inputs (docs/scaling.md says where each comes from and how to re-measure):

* docs/scaling-inputs.json  worker img/s per model/engine/device (bench/ingest.py), the
                            API's QPS and latency per load level (bench/query_api.py),
                            process memory;
* docs/scaling-store.json   Qdrant search latency and bytes per point at 100k and 1M
                            vectors (bench/store.py, Qdrant's engine embedded);
* docs/quality.json         bytes per vector of each reduction and quantization
                            (imgsearch eval).

Every number it prints comes from those files, the target on the command line, or an
assumption named in the output (and settable with a flag). Standard library only, so it
runs anywhere Python does. It prints the Markdown tables of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INPUTS = REPO / "docs" / "scaling-inputs.json"
STORE_RUNS = REPO / "docs" / "scaling-store.json"
QUALITY = REPO / "docs" / "quality.json"
GiB = 1024**3


@dataclass(frozen=True)
class Target:
    images: float
    uploads_per_s: float
    qps: float
    p99_ms: float
    engine: str = "mobilenetv2_100/torch/cpu"
    variant: str = "full"  # a docs/quality.json variant: full, pca:320, pca:320+int8, ...
    dim: int | None = None  # another model's width (resnet50: 2048): bytes scale per dimension
    points_per_image: float = 1.0  # CROP_MODE=all stores one more point per detected object
    replication: int = 2
    partitions: int = 12
    min_shards: int = 6
    hnsw_m: int = 16
    on_disk_vectors: bool = False
    on_disk_payload: bool = False
    node_memory_gib: float = 64.0
    utilisation: float = 0.7  # the share of a machine we plan to fill, leaving headroom
    segment_overhead: float = 0.25  # optimizer rebuilds and allocator slack (assumed)
    worker_img_per_s: float | None = None  # overrides the measured figure for the engine
    api_levels: str | None = None  # "qps:p99_ms,..." overrides the measured API levels
    network_ms: float = 2.0  # API -> Qdrant -> shards round trips (assumed)
    retention_days: float = 7.0
    event_bytes: float = 500.0  # README's example event is 346 B, plus Kafka's record overhead
    brokers: int = 3
    kafka_replication: int = 3
    lag_seconds: float = 60.0  # backlog one worker may hold before KEDA adds another


@dataclass
class Inputs:
    raw: dict[str, Any]
    store_runs: list[dict[str, Any]]
    quality: dict[str, Any]

    @classmethod
    def load(cls, inputs: Path = INPUTS, store: Path = STORE_RUNS,
             quality: Path = QUALITY) -> Inputs:
        return cls(json.loads(inputs.read_text()), json.loads(store.read_text()),
                   json.loads(quality.read_text()))

    def worker_rate(self, engine: str) -> dict[str, Any]:
        workers = self.raw["workers"]
        if engine not in workers:
            raise SystemExit(f"no measured worker rate for {engine!r}; measured: "
                             f"{', '.join(sorted(workers))}. Give --worker-img-per-s.")
        return workers[engine]

    def api(self, engine: str) -> dict[str, Any]:
        api = self.raw["api"]
        if engine not in api:
            raise SystemExit(f"no measured API levels for {engine!r}; measured: "
                             f"{', '.join(sorted(api))}. Give --api-levels QPS:P99,...")
        return api[engine]

    def vector_bytes(self, variant: str) -> dict[str, Any]:
        """float32 and quantized bytes per vector, as `imgsearch eval` measured them."""
        for run in self.quality["runs"]:
            if run["dataset"] != self.raw.get("quality_dataset", "birds"):
                continue
            for v in run["variants"]:
                if v["variant"] == variant:
                    b = v["bytes_per_vector"]
                    return {"dim": v["stored_dim"], "float32": b["float32"],
                            "quantized": b["quantized"] or 0.0,
                            "quantization": v["quantization"]}
        # (a variant not measured raises below)
        known = sorted({v["variant"] for r in self.quality["runs"] for v in r["variants"]})
        raise SystemExit(f"variant {variant!r} not in docs/quality.json; measured: {known}")


# -- the model ------------------------------------------------------------------------------------


@dataclass
class Plan:
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # (what, value, how)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, value: str, how: str = "") -> None:
        self.lines.append((what, value, how))


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def _gib(b: float) -> str:
    return f"{b / GiB:,.1f} GiB"


def store_run(runs: list[dict[str, Any]], dim: int) -> list[dict[str, Any]]:
    """Measured runs at the nearest dimension, HNSW m 16, no quantization, by size."""
    plain = [r for r in runs if r["quantization"] == "none" and r["hnsw_m"] == 16]
    if not plain:
        raise SystemExit("docs/scaling-store.json has no plain (m 16, float32) run")
    nearest = min({r["dim"] for r in plain}, key=lambda d: abs(math.log(d / dim)))
    return sorted((r for r in plain if r["dim"] == nearest), key=lambda r: r["n"])


def search_growth(runs: list[dict[str, Any]], key: str) -> float:
    """How much search latency grows, relative, per e-fold of points: measured on the
    dimension with the widest span of sizes (HNSW visits about log(n) nodes)."""
    plain = [r for r in runs if r["quantization"] == "none" and r["hnsw_m"] == 16]
    by_dim: dict[int, list[dict[str, Any]]] = {}
    for r in plain:
        by_dim.setdefault(r["dim"], []).append(r)
    spans = [sorted(rs, key=lambda r: r["n"]) for rs in by_dim.values() if len(rs) > 1]
    if not spans:
        return 0.0
    a, b = max(((rs[0], rs[-1]) for rs in spans), key=lambda ab: ab[1]["n"] / ab[0]["n"])
    return max(0.0, (b["edge"][key] / a["edge"][key] - 1) / math.log(b["n"] / a["n"]))


def search_ms(runs: list[dict[str, Any]], dim: int, n: float, key: str) -> float:
    """Search latency at ``n`` points per shard: the largest measurement at the nearest
    dimension, moved along log(n) by the measured growth, and scaled by the ratio of
    dimensions when the target's was not measured (distance computations)."""
    base = store_run(runs, dim)[-1]
    growth = search_growth(runs, key)
    at_n = base["edge"][key] * max(0.5, 1 + growth * math.log(max(n, 1) / base["n"]))
    return at_n * dim / base["dim"]


def vector_bytes(inputs: Inputs, t: Target) -> dict[str, Any]:
    """The variant's measured bytes per vector; with --dim, scaled to that width (float32
    is 4 B per dimension, int8 1 B plus a constant, binary 1 bit: all linear in dim)."""
    vec = inputs.vector_bytes(t.variant)
    if t.dim is None or t.dim == vec["dim"]:
        return vec
    scale = t.dim / vec["dim"]
    return {**vec, "dim": t.dim, "float32": vec["float32"] * scale,
            "quantized": vec["quantized"] * scale}


def per_point_bytes(inputs: Inputs, t: Target) -> dict[str, float]:
    vec = vector_bytes(inputs, t)
    # Links, payload and ids do not depend on the dimension: take the largest collection
    # measured, where the stores' fixed 32 MiB pages weigh least per point.
    plain = [r for r in inputs.store_runs if r["quantization"] == "none" and r["hnsw_m"] == 16]
    measured = max(plain, key=lambda r: r["n"])["edge"]["bytes_per_point"]
    # HNSW links at the target m where it was measured; otherwise scaled from m 16 (about
    # m links a point on the base layer; compression makes larger m cost more than that).
    at_m = [r for r in inputs.store_runs if r["quantization"] == "none"
            and r["hnsw_m"] == t.hnsw_m]
    links = (max(at_m, key=lambda r: r["n"])["edge"]["bytes_per_point"]["hnsw"] if at_m
             else measured["hnsw"] * t.hnsw_m / 16)
    return {
        "vectors (float32)": vec["float32"],
        "quantized copy": vec["quantized"],
        "HNSW links": links,
        "payload": measured["payload"],
        "payload index + ids": measured.get("payload_index", 0) + measured.get("id_tracker", 0),
    }


def plan(inputs: Inputs, t: Target) -> Plan:
    p = Plan()
    points = t.images * t.points_per_image

    # -- ingest: workers, partitions, KEDA ---------------------------------------------------
    if t.worker_img_per_s:
        rate, source = t.worker_img_per_s, "--worker-img-per-s"
    else:
        measured = inputs.worker_rate(t.engine)
        rate, source = measured["img_per_s"], f"measured, {t.engine}, {measured['cores']} cores"
    workers = max(1, _ceil(t.uploads_per_s / (rate * t.utilisation)))
    p.add("worker throughput", f"{rate:,.1f} img/s", source)
    p.add("ingest workers", f"{workers:,}",
          f"{t.uploads_per_s:,.0f} uploads/s / ({rate:,.1f} x {t.utilisation:.0%} utilisation)")
    if workers > t.partitions:
        p.add("topic partitions", f"{workers:,} or more",
              f"raise KAFKA_PARTITIONS / the KafkaTopic from {t.partitions}: a worker "
              "without a partition idles")
        p.notes.append(f"{workers} workers need at least {workers} partitions; set KEDA's "
                       "maxReplicaCount to the new partition count.")
    else:
        p.add("topic partitions", f"{t.partitions}", f"enough for up to {t.partitions} workers")
    p.add("KEDA lagThreshold", f"{_ceil(rate * t.lag_seconds):,}",
          f"{t.lag_seconds:.0f} s of one worker's work per worker")
    p.add("backfill of the whole gallery", f"{t.images / (workers * rate) / 3600:,.1f} h",
          f"{workers:,} worker{'s' * (workers != 1)} at {rate:,.1f} img/s (more workers, up "
          "to the partitions, shorten it)")

    # -- Qdrant: memory per point, nodes, shards --------------------------------------------
    vec = vector_bytes(inputs, t)
    sizes = per_point_bytes(inputs, t)
    in_ram = dict(sizes)
    if t.on_disk_vectors:
        in_ram["vectors (float32)"] = 0.0
        if not vec["quantized"]:
            p.notes.append("QDRANT_ON_DISK_VECTORS without quantization: every distance of "
                           "every search reads the disk. Use it with QUANTIZATION=int8 or "
                           "binary, whose copy stays in RAM.")
    if t.on_disk_payload:
        in_ram["payload"] = 0.0
    ram_point = sum(in_ram.values())
    disk_point = sum(sizes.values())
    copies = points * t.replication
    ram_total = copies * ram_point * (1 + t.segment_overhead)
    disk_total = copies * disk_point * 2  # optimizer rewrites segments beside the old ones
    usable = t.node_memory_gib * GiB * t.utilisation
    base_nodes = _ceil(ram_total / usable)
    # One node more than memory needs: the survivors hold everything while one is lost or
    # drained, and a Raft quorum (3) survives one loss.
    nodes = max(3, t.replication + 1, base_nodes + 1)
    shards = max(t.min_shards, nodes)
    shards = _ceil(shards / nodes) * nodes
    per_shard = points / shards
    ram_node = ram_total / (nodes - 1)
    for what, b in sizes.items():
        where = " (on disk)" if b and not in_ram[what] else ""
        p.add(f"bytes per point: {what}", f"{b:,.0f}{where}" if b else "–", "")
    p.add("RAM per point (one copy)", f"{ram_point:,.0f} B",
          f"{t.variant}, {vec['dim']}-d, HNSW m {t.hnsw_m}")
    p.add("Qdrant RAM, all copies", _gib(ram_total),
          f"{points:,.0f} points x {t.replication} replicas x (1 + {t.segment_overhead:.0%} "
          "segment overhead)")
    p.add("Qdrant nodes", f"{nodes}",
          f"{t.node_memory_gib:g} GiB machines filled to {t.utilisation:.0%}, plus one spare "
          "(at least 3)")
    p.add("Qdrant memory request per node", _gib(ram_node),
          f"everything on {nodes - 1} nodes (one lost or drained)")
    p.add("Qdrant disk per node", _gib(disk_total / (nodes - 1)),
          "all files, doubled for segment rebuilds")
    p.add("QDRANT_SHARDS", f"{shards}", f"a multiple of {nodes} nodes, at least {t.min_shards}")
    p.add("points per shard", f"{per_shard:,.0f}", "")

    # -- query: API replicas for QPS at p99 --------------------------------------------------
    s50 = search_ms(inputs.store_runs, vec["dim"], per_shard, "p50_ms")
    s99 = search_ms(inputs.store_runs, vec["dim"], per_shard, "p99_ms")
    measured_n = max(r["n"] for r in store_run(inputs.store_runs, vec["dim"]))
    extrapolated = per_shard > measured_n * 1.01
    p.add("search per shard p50 / p99", f"{s50:.2f} / {s99:.2f} ms",
          f"measured at {measured_n:,} points, {vec['dim']}-d"
          + (", extrapolated in log(n)" if extrapolated else ""))
    if t.api_levels:
        levels = [dict(zip(("qps", "p99_ms"), map(float, lv.split(":")), strict=True))
                  for lv in t.api_levels.split(",")]
        api_source = "--api-levels"
    else:
        api = inputs.api(t.engine)
        levels, api_source = api["levels"], f"measured, {t.engine}, {api['cores']} cores"
    # The API's own p99 was measured against a tiny collection: add the store's p99 at the
    # target size (every query waits for its slowest shard) and the network.
    fitting = [lv for lv in levels if lv["p99_ms"] + s99 + t.network_ms <= t.p99_ms]
    if not fitting:
        best = min(levels, key=lambda lv: lv["p99_ms"])
        p.add("API replicas", "target not reachable",
              f"lowest measured p99 {best['p99_ms']:.0f} ms + search {s99:.1f} ms + network "
              f"{t.network_ms:g} ms > {t.p99_ms:g} ms")
        p.notes.append("The p99 target is below what one replica measured even unloaded: a "
                       "faster engine or device (--api-levels), or a cheaper model, is needed.")
    else:
        level = max(fitting, key=lambda lv: lv["qps"])
        replicas = max(2, _ceil(t.qps / (level["qps"] * t.utilisation)))
        p.add("API QPS per replica within p99", f"{level['qps']:,.1f}",
              f"{api_source}: p99 {level['p99_ms']:.0f} ms + search {s99:.1f} ms + network "
              f"{t.network_ms:g} ms <= {t.p99_ms:g} ms")
        p.add("API replicas", f"{replicas}",
              f"{t.qps:,.0f} QPS / ({level['qps']:,.1f} x {t.utilisation:.0%}), at least 2; "
              "HPA maxReplicas above it")
    # Each query searches every shard once (on one of its replicas).
    cores = t.qps * shards * s50 / 1000 / t.utilisation
    p.add("Qdrant CPU for search", f"{cores:,.1f} cores ({cores / nodes:,.1f} per node)",
          f"{t.qps:,.0f} QPS x {shards} shards x {s50:.2f} ms")

    # -- Kafka ---------------------------------------------------------------------------------
    kafka_disk = (t.uploads_per_s * t.event_bytes * t.retention_days * 86400
                  * t.kafka_replication / t.brokers * 2)
    p.add("Kafka brokers", f"{t.brokers}",
          f"replication {t.kafka_replication}, min.insync.replicas {t.kafka_replication - 1}")
    p.add("Kafka disk per broker", _gib(kafka_disk),
          f"{t.uploads_per_s:,.0f}/s x {t.event_bytes:,.0f} B x {t.retention_days:g} days x "
          f"{t.kafka_replication} copies / {t.brokers}, doubled")
    if extrapolated:
        p.notes.append(f"Search latency at {per_shard:,.0f} points per shard is extrapolated "
                       f"from measurements up to {measured_n:,} (bench/store.py); measure at "
                       "your size before committing to the p99.")
    return p


# -- output ---------------------------------------------------------------------------------------


def markdown(p: Plan, t: Target) -> str:
    head = (f"Target: {t.images:,.0f} images, {t.uploads_per_s:,.0f} uploads/s, "
            f"{t.qps:,.0f} QPS at p99 <= {t.p99_ms:g} ms; {t.engine}, vectors {t.variant}"
            + (", float32 vectors on disk" if t.on_disk_vectors else "")
            + f", {t.replication} replicas per shard.")
    rows = ["| | value | how |", "|---|---:|---|"]
    rows += [f"| {what} | {value} | {how} |" for what, value, how in p.lines]
    notes = [f"* {n}" for n in p.notes]
    return "\n".join([head, "", *rows, *([""] + notes if notes else [])])


def measured_markdown(inputs: Inputs) -> str:
    """The measured inputs, as the tables of docs/scaling.md show them."""
    out = ["Ingest workers (bench/ingest.py, Kafka path: events through a broker into the "
           "worker and the store):", "",
           "| model / engine / device | cores | img/s | memory MiB |", "|---|---:|---:|---:|"]
    for key, w in sorted(inputs.raw["workers"].items()):
        rss = f"{w['rss_mib']:,}" if w.get("rss_mib") else "–"
        out.append(f"| {key} | {w['cores']} | {w['img_per_s']:,.1f} | {rss} |")
    out += [""] + [f"* {key}: {w['measured']}" for key, w in sorted(inputs.raw["workers"].items())]
    out += ["", "Query API, one replica (bench/query_api.py, batching on, closed loop):", "",
            "| model / engine / device | clients | QPS | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|"]
    for key, api in sorted(inputs.raw["api"].items()):
        for lv in api["levels"]:
            out.append(f"| {key} | {lv['clients']} | {lv['qps']:,.1f} | {lv['p50_ms']:,.1f} "
                       f"| {lv['p99_ms']:,.1f} |")
    out += [""] + [f"* {key}: {api['measured']}" for key, api in sorted(inputs.raw["api"].items())]
    out += ["", "Qdrant's engine (bench/store.py, Qdrant Edge: the server's segment, HNSW and "
            "search code, in-process; k=10, single-threaded queries):", "",
            ("| points | dim | quantization | HNSW m / ef_construct | build (optimize) s "
             "| search p50 ms | search p99 ms | recall@10 | HNSW B/point | payload B/point "
             "| load |"),
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(inputs.store_runs, key=lambda r: (r["quantization"], r["dim"], r["n"])):
        e, b = r["edge"], r["edge"]["bytes_per_point"]
        out.append(f"| {r['n']:,} | {r['dim']} | {r['quantization']} "
                   f"| {r['hnsw_m']} / {r['hnsw_ef_construct']} "
                   f"| {e['optimize_s']:,.0f} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} "
                   f"| {e['recall_at_10']:.3f} | {b['hnsw']:,.0f} | {b['payload']:,.0f} "
                   f"| {r['load_average']} |")
    out += ["", "Bytes per vector (imgsearch eval, docs/quality.json, birds):", "",
            "| variant | stored dim | float32 B | quantized B (in RAM) |", "|---|---:|---:|---:|"]
    run = next(r for r in inputs.quality["runs"]
               if r["dataset"] == inputs.raw.get("quality_dataset", "birds"))
    for v in run["variants"]:
        b = v["bytes_per_vector"]
        out.append(f"| {v['variant']} | {v['stored_dim']} | {b['float32']:,.0f} | "
                   + (f"{b['quantized']:,.0f}" if b["quantized"] else "–") + " |")
    return "\n".join(out)


def parse(argv: Sequence[str] | None = None) -> Target:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Target(0, 0, 0, 0)
    parser.add_argument("--images", type=float, required=True)
    parser.add_argument("--uploads-per-s", type=float, required=True)
    parser.add_argument("--qps", type=float, required=True)
    parser.add_argument("--p99-ms", type=float, required=True)
    for name, value in vars(defaults).items():
        if name in ("images", "uploads_per_s", "qps", "p99_ms"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            unset = {"worker_img_per_s": float, "dim": int, "api_levels": str}
            kind = type(value) if value is not None else unset[name]
            parser.add_argument(flag, type=kind, default=value)
    args = parser.parse_args(argv)
    return Target(**vars(args))


def main(argv: Sequence[str] | None = None, inputs: Inputs | None = None) -> str:
    """Print the plan for the target in ``argv``, or with ``--measured`` the inputs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    inputs = inputs or Inputs.load()
    if argv == ["--measured"]:
        text = measured_markdown(inputs)
        print(text)
        return text
    target = parse(argv)
    text = markdown(plan(inputs, target), target)
    print(text)
    return text


if __name__ == "__main__":
    main()
