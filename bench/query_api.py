"""Query API latency and throughput per engine (and with dynamic batching on and off),
side by side.

    python bench/query_api.py                       # every installed engine, batching on
    python bench/query_api.py --engine torch --engine openvino --compare-batching
    python bench/query_api.py --queries imagenet-sample --seconds 10 --device cuda

In one run it:

1. indexes a gallery of bird photos into a temporary embedded store with the torch engine
   (the ingest pipeline); every other engine's server answers from a copy of that same
   store: switching engines needs no re-indexing;
2. starts one real server per side (`python -m query_api` on 127.0.0.1): one per engine
   (EMBED_ENGINE), with API_BATCHING on, and with --compare-batching one more per engine
   with it off, each on its own copy of the store;
3. measures each engine alone, in this process: the forward pass of one preprocessed query
   (batch 1), and the decode+preprocess of one query image;
4. single-query latency (one client, sequential), interleaved with 3: p50, p95, p99
   through HTTP, and p50 minus the engine's own batch-1 forward p50;
5. closed-loop load at each client count, alternating the sides slice by slice (so all
   see the same machine conditions): throughput, p50, p99, mean batch size, and each
   side's throughput relative to the torch side's.

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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.components import Components  # noqa: E402
from shared.config import Settings, load_settings  # noqa: E402
from shared.embedding import Embedder  # noqa: E402
from shared.events import ImageUploaded  # noqa: E402
from shared.images import decode  # noqa: E402
from shared.models.choice import ENGINES, installed  # noqa: E402
from shared.pipeline.stages import WorkItem  # noqa: E402

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


def base_settings(args: argparse.Namespace, store: Path, engine: str = "torch") -> Settings:
    weights = ASSETS / "weights" / f"{MODEL}.safetensors"
    return load_settings(qdrant_path=store, model_name=MODEL, model_weights=weights,
                         device=args.device, image_file_roots=[ASSETS / "data"],
                         worker_metrics_port=0, embed_engine=engine)


def build_store(settings: Settings, embedder: Embedder,
                gallery: list[tuple[str, Path, str]]) -> None:
    components = Components.load(settings, embedder=embedder)
    try:
        items = [
            WorkItem(image_id, ImageUploaded(f"bench-{n}", "bench", image_id, path.as_uri(), None,
                                             {"label": label}))
            for n, (image_id, path, label) in enumerate(gallery)
        ]
        report = components.ingest(items)
        if report.count("stored") != len(items):
            sys.exit(f"indexing failed: {report.summary()}")
    finally:
        components.close()


class Server:
    def __init__(self, args: argparse.Namespace, store: Path, batching: bool, log: Path,
                 engine: str = "torch") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        weights = ASSETS / "weights" / f"{MODEL}.safetensors"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "QDRANT_", "MODEL_"))}
        env.update({
            "QDRANT_PATH": str(store), "MODEL_NAME": MODEL, "MODEL_WEIGHTS": str(weights),
            "DEVICE": args.device, "API_HOST": "127.0.0.1", "API_PORT": str(self.port),
            "EMBED_ENGINE": engine,
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


def prepare(embedder: Embedder, data: bytes) -> object:
    """What the query path does before the forward pass: scaled decode, preprocess."""
    return embedder.preprocess(decode(data, max_pixels=40_000_000,
                                      need=embedder.decode_need).image)


def time_model(embedder: Embedder, data: bytes) -> tuple[float, float]:
    """Seconds for decode+preprocess, and for the forward pass at batch 1."""
    t0 = time.perf_counter()
    tensor = prepare(embedder, data)
    t1 = time.perf_counter()
    embedder.embed([tensor])
    return t1 - t0, time.perf_counter() - t1


def single_queries(
    embedders: dict[str, Embedder], servers: dict[str, str], bodies: list[bytes], n: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]],
           dict[str, list[float]]]:
    """Sequential queries, one client, interleaved with each engine alone on the same
    photo (forward pass at batch 1, and decode+preprocess), so all see the same machine
    load. The order rotates every round, so no side always runs right after another one
    (whose threads may still be spinning). Also returns each query's own forward time as
    the server reported it (timing.embed_ms)."""
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    server_forward: dict[str, list[float]] = {name: [] for name in servers}
    forward: dict[str, list[float]] = {name: [] for name in embedders}
    prep: dict[str, list[float]] = {name: [] for name in embedders}
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in servers.items()}
    # The model runs in a thread of its own, as in the server (whose forward passes run in
    # the batcher's thread): on a busy machine the main thread's OpenMP team fares worse.
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    steps = [*(f"model:{e}" for e in embedders), *servers]
    try:
        for i in range(n + 5):
            data = bodies[i % len(bodies)]
            keep = i >= 5  # warm connections and caches first
            shift = i % len(steps)
            for step in steps[shift:] + steps[:shift]:
                if step.startswith("model:"):
                    engine = step.partition(":")[2]
                    prep_s, forward_s = model_thread.submit(
                        time_model, embedders[engine], data).result()
                    if keep:
                        prep[engine].append(prep_s)
                        forward[engine].append(forward_s)
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
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--engine", action="append", choices=ENGINES,
                        help="engine (repeatable; default: every installed one)")
    parser.add_argument("--compare-batching", action="store_true",
                        help="also run each engine with API_BATCHING=false")
    parser.add_argument("--seconds", type=float, default=9.0,
                        help="measured time per level and side, split over --rounds slices")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per slice")
    parser.add_argument("--single", type=int, default=150, help="sequential single queries")
    parser.add_argument("--batch-max-size", type=int, default=8)
    parser.add_argument("--batch-max-wait-ms", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    engines = args.engine or [e for e in ENGINES if installed(e)]
    sides = [(e, e, True) for e in engines]
    if args.compare_batching:
        sides += [(f"{e}/off", e, False) for e in engines]

    gallery, queries = gallery_and_queries(args)
    bodies = [p.read_bytes() for p in queries]
    tmp = Path(tempfile.mkdtemp(prefix="bench-query-api-"))
    servers: dict[str, Server] = {}
    try:
        embedders = {e: Embedder.from_settings(base_settings(args, tmp / "store", e))
                     for e in engines}
        t0 = time.perf_counter()
        build_store(base_settings(args, tmp / "store"),
                    embedders.get("torch") or Embedder.from_settings(
                        base_settings(args, tmp / "store")), gallery)
        print(f"indexed {len(gallery)} birds with the torch engine in "
              f"{time.perf_counter() - t0:.1f}s; queries: {len(queries)} {args.queries} photos; "
              f"{os.cpu_count()} CPUs, device {args.device}; engines: " + "; ".join(
                  f"{e}: {embedders[e].describe()}" for e in engines), flush=True)
        for name, engine, batching in sides:
            copy = tmp / f"store-{name.replace('/', '-')}"
            shutil.copytree(tmp / "store", copy)
            servers[name] = Server(args, copy, batching, tmp / f"server-{name.replace('/', '-')}.log",
                                   engine)
        for server in servers.values():
            server.wait_ready()

        single, server_forward, forward, prep = single_queries(
            embedders, {name: s.url for name, s in servers.items()}, bodies, args.single)
        single_load = os.getloadavg()[0]
        for embedder in embedders.values():
            embedder.close()
        del embedders

        results: dict[tuple[str, int], Load] = {}
        level_load: dict[int, float] = {}
        for clients in levels:
            # Several short slices per level, sides alternating: background load on a
            # shared machine then hits them all alike.
            for _ in range(args.rounds):
                for name, server in servers.items():
                    part = asyncio.run(run_load(server.url, bodies, clients,
                                                args.seconds / args.rounds, args.warmup))
                    total = results.setdefault((name, clients), Load(clients))
                    total.seconds += part.seconds
                    total.latencies += part.latencies
                    total.batch_sizes += part.batch_sizes
                    total.errors += part.errors
            level_load[clients] = os.getloadavg()[0]
            for name in servers:
                r = results[(name, clients)]
                print(f"  {clients:>3} clients, {name:<16}: {r.throughput:6.1f} req/s "
                      f"p99 {pct(r.latencies, 99) * 1000:6.1f} ms  errors {r.errors}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"Each engine alone ({MODEL}, batch 1, {args.device}), interleaved with the single "
          f"queries (load {single_load:.1f}):")
    for engine in engines:
        print(f"  {engine:<12} forward p50 {statistics.median(forward[engine]) * 1000:6.1f} ms "
              f"(p95 {pct(forward[engine], 95) * 1000:.1f} ms); decode+preprocess p50 "
              f"{statistics.median(prep[engine]) * 1000:.1f} ms")
    print()
    print("Single query, one client, sequential (HTTP round trip; 'its forward' is the forward "
          "pass inside the server for that query; target: p50 - engine forward <= 5 ms):")
    print(f"  {'':<16}{'p50':>9}{'p95':>9}{'p99':>9} | {'its forward p50':>15} | "
          f"{'p50 - engine forward p50':>24}")
    for name, engine, _ in sides:
        lat, own = single[name], server_forward[name]
        p50 = pct(lat, 50)
        print(f"  {name:<16}{p50 * 1000:8.1f}ms{pct(lat, 95) * 1000:7.1f}ms"
              f"{pct(lat, 99) * 1000:7.1f}ms | {pct(own, 50) * 1000:13.1f}ms | "
              f"{(p50 - statistics.median(forward[engine])) * 1000:+22.1f}ms")
    print()
    print(f"Concurrent clients, closed loop, {args.seconds:.0f}s per level and side "
          f"(API_BATCH_MAX_SIZE={args.batch_max_size}, API_BATCH_MAX_WAIT_MS="
          f"{args.batch_max_wait_ms}); 'x torch': throughput over the torch side's:")
    print(f"  {'clients':>7} {'side':<16}{'req/s':>8}{'p50':>9}{'p99':>9}{'batch':>7}"
          f"{'x torch':>9}  load")
    for clients in levels:
        base = results.get(("torch", clients))
        for name in servers:
            r = results[(name, clients)]
            mean_batch = statistics.fmean(r.batch_sizes) if r.batch_sizes else float("nan")
            ratio = r.throughput / base.throughput if base and base.throughput else float("nan")
            print(f"  {clients:>7} {name:<16}{r.throughput:8.1f}{pct(r.latencies, 50) * 1000:7.1f}ms"
                  f"{pct(r.latencies, 99) * 1000:7.1f}ms{mean_batch:7.2f}{ratio:8.2f}x"
                  f"  {level_load[clients]:.1f}")
    errors = sum(r.errors for r in results.values())
    load = os.getloadavg()
    print(f"\nerrors: {errors}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} on {os.cpu_count()} CPUs (other work on the machine skews absolute "
          "numbers; sides alternate so the ratios stay comparable)")


if __name__ == "__main__":
    main()
