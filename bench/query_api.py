"""Query API latency and throughput, with dynamic batching on and off, side by side.

    python bench/query_api.py                       # CPU defaults: 300 birds, 1/8/32/64 clients
    python bench/query_api.py --queries imagenet-sample --seconds 10 --device cuda

In one run it:

1. indexes a gallery of bird photos into a temporary embedded store (the ingest pipeline);
2. starts two real servers (`python -m query_api` on 127.0.0.1), one with API_BATCHING=true
   and one with false, each on its own copy of the store;
3. measures the model alone: the forward pass of one preprocessed query (batch 1), and the
   decode+preprocess of one query image;
4. single-query latency (one client, sequential): p50, p95, p99 through HTTP;
5. closed-loop load at each client count, alternating the batching-on and -off servers level
   by level (so both see the same machine conditions): throughput, p50, p99, mean batch size.

Queries are real photos: held-out birds (test split, not in the gallery) or imagenet-sample.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.components import Components  # noqa: E402
from shared.config import Settings, load_settings  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.events import ImageUploaded  # noqa: E402
from shared.images import decode_image  # noqa: E402
from shared.pipeline import WorkItem  # noqa: E402

ASSETS = Path(os.environ.get("IMGSEARCH_ASSETS", REPO.parent / "shared"))
MODEL = "mobilenetv2_100"


@dataclass
class Load:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- setup ------------------------------------------------------------------------------------


def gallery_and_queries(args: argparse.Namespace) -> tuple[list[tuple[str, Path, str]], list[Path]]:
    birds = ASSETS / "data" / "birds"
    with (birds / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if r["split"] == "train"]
    step = max(1, len(train) // args.gallery)
    gallery = [(r["path"], birds / r["path"], r["label"]) for r in train[::step][: args.gallery]]
    if args.queries == "birds":
        queries = [birds / r["path"] for r in rows if r["split"] == "test"][: args.query_images]
    else:
        sample = ASSETS / "data" / "imagenet-sample"
        queries = sorted(sample.glob("*.JPEG"))[: args.query_images]
    if not gallery or not queries:
        sys.exit(f"no photos under {ASSETS}/data: set IMGSEARCH_ASSETS")
    return gallery, queries


def base_settings(args: argparse.Namespace, store: Path) -> Settings:
    weights = ASSETS / "weights" / f"{MODEL}.safetensors"
    return load_settings(qdrant_path=store, model_name=MODEL, model_weights=weights,
                         device=args.device, image_file_roots=[ASSETS / "data"],
                         worker_metrics_port=0)


def build_store(settings: Settings, embedder: Embedder,
                gallery: list[tuple[str, Path, str]]) -> None:
    components = Components.load(settings, embedder=embedder)
    pipeline = components.pipeline()
    try:
        items = [
            WorkItem(image_id, ImageUploaded(f"bench-{n}", "bench", image_id, path.as_uri(), None,
                                             {"label": label}))
            for n, (image_id, path, label) in enumerate(gallery)
        ]
        report = pipeline.process(items)
        if report.count("stored") != len(items):
            sys.exit(f"indexing failed: {report.summary()}")
    finally:
        pipeline.close()
        components.close()


class Server:
    def __init__(self, args: argparse.Namespace, store: Path, batching: bool, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        weights = ASSETS / "weights" / f"{MODEL}.safetensors"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "QDRANT_", "MODEL_"))}
        env.update({
            "QDRANT_PATH": str(store), "MODEL_NAME": MODEL, "MODEL_WEIGHTS": str(weights),
            "DEVICE": args.device, "API_HOST": "127.0.0.1", "API_PORT": str(self.port),
            "API_BATCHING": "true" if batching else "false",
            "API_BATCH_MAX_SIZE": str(args.batch_max_size),
            "API_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        })
        self.log = log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "query_api"], cwd=REPO, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        sys.exit(f"server on {self.url} not ready after {timeout_s}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# -- measurements -----------------------------------------------------------------------------


def prepare(embedder: Embedder, data: bytes) -> torch.Tensor:
    return embedder.preprocess(decode_image(data, max_pixels=40_000_000))


def time_model(embedder: Embedder, data: bytes) -> tuple[float, float]:
    """Seconds for decode+preprocess, and for the forward pass at batch 1."""
    t0 = time.perf_counter()
    tensor = prepare(embedder, data)
    t1 = time.perf_counter()
    embedder.embed([tensor])
    return t1 - t0, time.perf_counter() - t1


def single_queries(
    embedder: Embedder, servers: dict[str, str], bodies: list[bytes], n: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float], list[float]]:
    """Sequential queries, one client, interleaved with the model alone on the same photo
    (forward pass at batch 1, and decode+preprocess), so all see the same machine load.
    The order rotates every round, so no side always runs right after another one (whose
    OpenMP threads may still be spinning). Also returns each query's own forward time as
    the server reported it (timing.embed_ms)."""
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    server_forward: dict[str, list[float]] = {name: [] for name in servers}
    forward: list[float] = []
    prep: list[float] = []
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in servers.items()}
    # The model runs in a thread of its own, as in the server (whose forward passes run in
    # the batcher's thread): on a busy machine the main thread's OpenMP team fares worse.
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    steps = ["model", *servers]
    try:
        for i in range(n + 5):
            data = bodies[i % len(bodies)]
            keep = i >= 5  # warm connections and caches first
            shift = i % len(steps)
            for step in steps[shift:] + steps[:shift]:
                if step == "model":
                    prep_s, forward_s = model_thread.submit(time_model, embedder, data).result()
                    if keep:
                        prep.append(prep_s)
                        forward.append(forward_s)
                    continue
                t = time.perf_counter()
                r = clients[step].post("/search", content=data, params={"limit": 10},
                                       headers={"content-type": "image/jpeg"})
                elapsed = time.perf_counter() - t
                r.raise_for_status()
                if keep:
                    latencies[step].append(elapsed)
                    server_forward[step].append(r.json()["timing"]["embed_ms"] / 1000)
    finally:
        model_thread.shutdown()
        for client in clients.values():
            client.close()
    return latencies, server_forward, forward, prep


async def run_load(url: str, bodies: list[bytes], clients: int, seconds: float,
                   warmup_s: float) -> Load:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    result = Load(clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        counter = 0
        measuring = False
        stop_at = time.perf_counter() + warmup_s + seconds

        async def worker(offset: int) -> None:
            nonlocal counter
            i = offset
            while time.perf_counter() < stop_at:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/search", content=body, params={"limit": 10},
                                          headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - t0
                if not measuring:
                    continue
                if not ok:
                    result.errors += 1
                    continue
                result.latencies.append(elapsed)
                result.batch_sizes.append(r.json()["timing"]["batch_size"])

        tasks = [asyncio.create_task(worker(k)) for k in range(clients)]
        await asyncio.sleep(warmup_s)
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=300, help="bird photos to index")
    parser.add_argument("--queries", choices=["birds", "imagenet-sample"], default="birds")
    parser.add_argument("--query-images", type=int, default=200)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=9.0,
                        help="measured time per level and side, split over --rounds slices")
    parser.add_argument("--rounds", type=int, default=3, help="on/off alternations per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per slice")
    parser.add_argument("--single", type=int, default=150, help="sequential single queries")
    parser.add_argument("--batch-max-size", type=int, default=8)
    parser.add_argument("--batch-max-wait-ms", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    gallery, queries = gallery_and_queries(args)
    bodies = [p.read_bytes() for p in queries]
    tmp = Path(tempfile.mkdtemp(prefix="bench-query-api-"))
    servers: list[Server] = []
    try:
        settings = base_settings(args, tmp / "store-on")
        embedder = Embedder.from_settings(settings)
        t0 = time.perf_counter()
        build_store(settings, embedder, gallery)
        print(f"indexed {len(gallery)} birds in {time.perf_counter() - t0:.1f}s; queries: "
              f"{len(queries)} {args.queries} photos; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs, device {args.device}", flush=True)
        shutil.copytree(tmp / "store-on", tmp / "store-off")

        on = Server(args, tmp / "store-on", True, tmp / "server-on.log")
        off = Server(args, tmp / "store-off", False, tmp / "server-off.log")
        servers = [on, off]
        on.wait_ready()
        off.wait_ready()

        single, server_forward, forward, prep = single_queries(
            embedder, {"on": on.url, "off": off.url}, bodies, args.single)
        forward_s, prep_s = statistics.median(forward), statistics.median(prep)
        del embedder

        results: dict[tuple[str, int], Load] = {}
        for clients in levels:
            # Several short on/off slices per level: background load on a shared machine
            # then hits both sides alike.
            for _ in range(args.rounds):
                for name, server in (("on", on), ("off", off)):
                    part = asyncio.run(run_load(server.url, bodies, clients,
                                                args.seconds / args.rounds, args.warmup))
                    total = results.setdefault((name, clients), Load(clients))
                    total.seconds += part.seconds
                    total.latencies += part.latencies
                    total.batch_sizes += part.batch_sizes
                    total.errors += part.errors
            for name in ("on", "off"):
                r = results[(name, clients)]
                print(f"  {clients:>3} clients, batching {name:<3}: {r.throughput:6.1f} req/s "
                      f"p99 {pct(r.latencies, 99) * 1000:6.1f} ms  errors {r.errors}", flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"Model alone ({MODEL}, batch 1, {args.device}), interleaved with the single queries: "
          f"forward p50 {forward_s * 1000:.1f} ms (p95 {pct(forward, 95) * 1000:.1f} ms); "
          f"decode+preprocess p50 {prep_s * 1000:.1f} ms")
    print()
    print("Single query, one client, sequential (HTTP round trip; 'its forward' is the forward "
          "pass inside the server for that query):")
    print(f"  {'':<14}{'p50':>9}{'p95':>9}{'p99':>9} | {'its forward p50':>15} | "
          f"{'p50 - model forward':>19} | {'p50 of (round trip - its forward)':>33}")
    for name in ("on", "off"):
        lat, own = single[name], server_forward[name]
        p50 = pct(lat, 50)
        overhead = [a - b for a, b in zip(lat, own, strict=True)]
        print(f"  {'batching ' + name:<14}{p50 * 1000:8.1f}ms{pct(lat, 95) * 1000:7.1f}ms"
              f"{pct(lat, 99) * 1000:7.1f}ms | {pct(own, 50) * 1000:13.1f}ms | "
              f"{(p50 - forward_s) * 1000:+17.1f}ms | {pct(overhead, 50) * 1000:31.1f}ms")
    print()
    print(f"Concurrent clients, closed loop, {args.seconds:.0f}s per level and side "
          f"(API_BATCH_MAX_SIZE={args.batch_max_size}, API_BATCH_MAX_WAIT_MS={args.batch_max_wait_ms}):")
    print(f"  {'clients':>7} | {'batching on':^36} | {'batching off':^26} | {'speed-up':>8}")
    print(f"  {'':>7} | {'req/s':>8}{'p50':>9}{'p99':>9}{'batch':>9} | {'req/s':>8}{'p50':>9}"
          f"{'p99':>9} | {'':>8}")
    for clients in levels:
        a, b = results[("on", clients)], results[("off", clients)]
        mean_batch = statistics.fmean(a.batch_sizes) if a.batch_sizes else float("nan")
        print(f"  {clients:>7} | {a.throughput:8.1f}{pct(a.latencies, 50) * 1000:7.1f}ms"
              f"{pct(a.latencies, 99) * 1000:7.1f}ms{mean_batch:9.2f} | {b.throughput:8.1f}"
              f"{pct(b.latencies, 50) * 1000:7.1f}ms{pct(b.latencies, 99) * 1000:7.1f}ms | "
              f"{a.throughput / b.throughput if b.throughput else float('nan'):7.2f}x")
    errors = sum(r.errors for r in results.values())
    load = os.getloadavg()
    print(f"\nerrors: {errors}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} on {os.cpu_count()} CPUs (other work on the machine skews absolute "
          "numbers; on/off slices alternate so the ratios stay comparable)")


if __name__ == "__main__":
    main()
