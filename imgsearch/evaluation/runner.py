"""Run an evaluation: index a dataset's gallery through the real pipeline, query, measure.

For each dataset and model, the gallery is indexed once per *variant* (full vectors, a
random or PCA reduction, int8 or binary quantization), each into its own embedded store
in a temporary directory, through ``Components`` and ``IngestPipeline`` exactly as
``imgsearch index`` and the Kafka worker do. The first variant is always the full-size
float32 reference; the others are compared with it.

The model runs once per image per model: the first variant's pipeline embeds for real
(its ingest throughput is the model's), later variants' pipelines get the same vectors
from a cache keyed by the exact input tensor, so what differs between variants is only
what the store does (projection, quantization, index), and that is what they time.

Queries that are gallery images use their stored vectors (as the API's search by
image id does) and exclude their own id; other queries (a test split, edited copies) go
through the one query path (shared/query.py) as an uploaded query image does: scaled
decode, the gallery's crop policy (a detector crops queries as it cropped the gallery),
the query views (``+fullframe`` variants add the full frame), embed, merge; a query with
several crops searches with each and keeps each image's best score. A separate sample of
queries is timed end to end (read, decode, embed at batch 1, search) for the latency
column.

Stores are built with ``VECTOR_INDEXING_THRESHOLD_KB=1``: every segment gets its HNSW
index and quantized copy as a large collection's would, so the recall and memory of
approximate search and quantization are what is measured, not an exact scan of a
collection too small to be indexed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from imgsearch.evaluation.dataset import Dataset, Item
from imgsearch.evaluation.edits import Edit, make_copy, resolve_edits
from imgsearch.evaluation.metrics import (
    relevance,
    relevant_counts,
    retrieval_metrics,
    top1_accuracy,
)
from imgsearch.files import ImageFile
from imgsearch.index import file_event
from shared.components import Components
from shared.config import Settings, load_settings
from shared.embedding import Embedder, ModelInfo
from shared.errors import ImgSearchError
from shared.images import Decoded, DecodeNeed, decode_image
from shared.pipeline.stages import WorkItem
from shared.query import QueryEmbedder
from shared.query import search as search_store
from shared.reduction import fit_pca
from shared.store.base import VectorStore

Progress = Callable[[str], None]
COLLECTION = "eval"
QUANTIZATIONS = ("none", "int8", "binary")


# -- what to run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """How the store keeps vectors: an optional reduction, then optional quantization;
    and how copies query it (``full_frame``: QUERY_FULL_FRAME_VIEW)."""

    reduction: str = "none"
    dim: int | None = None
    quantization: str = "none"
    oversampling: float | None = None  # None: QUANTIZATION_OVERSAMPLING's default
    full_frame: bool = False

    @property
    def name(self) -> str:
        parts = ["full" if self.reduction == "none" else f"{self.reduction}:{self.dim}"]
        if self.quantization != "none":
            parts.append(self.quantization + (f":x{self.oversampling:g}" if self.oversampling
                                              else ""))
        if self.full_frame:
            parts.append("fullframe")
        return "+".join(parts)

    @property
    def is_reference(self) -> bool:
        return self.reduction == "none" and self.quantization == "none" and not self.full_frame

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``full``, ``random:320``, ``pca:512``, ``int8``, ``binary``, ``binary:x8`` (rescore
        8x the results), ``random:1280+binary``: a reduction and a quantization.
        ``+fullframe`` queries copies with QUERY_FULL_FRAME_VIEW (e.g. ``full+fullframe``)."""
        reduction, dim, quantization, oversampling, full_frame = "none", None, "none", None, False
        for part in (p.strip() for p in text.split("+")):
            method, _, size = part.partition(":")
            if method in ("full", "none") and not size:
                continue
            if method == "fullframe" and not size:
                full_frame = True
            elif method in QUANTIZATIONS[1:] and (not size or _factor(size[1:]) and size[0] == "x"):
                quantization, oversampling = method, _factor(size[1:]) if size else None
            elif method in ("random", "pca") and size.isdigit() and int(size) > 0:
                reduction, dim = method, int(size)
            else:
                raise ValueError(
                    f"cannot read variant {text!r}: use full, random:N, pca:N, int8, binary "
                    "(binary:x8 rescores 8x the results), or a reduction and a quantization "
                    "joined by '+', e.g. pca:320+int8; add +fullframe to query copies with "
                    "QUERY_FULL_FRAME_VIEW"
                )
        return cls(reduction, dim, quantization, oversampling, full_frame)


def _factor(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 1.0 <= value <= 100.0 else None


@dataclass(frozen=True)
class ModelChoice:
    name: str
    weights: Path | None = None
    random_weights: bool = False  # speed columns only; quality is meaningless


@dataclass(frozen=True)
class EvalOptions:
    ks: tuple[int, ...] = (1, 5, 10)
    labels: bool = True
    copies: bool = False
    edits: tuple[str, ...] | None = None
    copies_sample: int = 500  # originals to make edited copies of (seeded)
    use_split: bool = True
    limit: int | None = None  # evaluate a seeded subset of each dataset
    seed: int = 0
    reduction_seed: int = 0
    pca_sample: int = 2000  # gallery vectors a PCA is fitted on (seeded)
    rescore: bool = True
    oversampling: float | None = None
    latency_sample: int = 50
    batch_size: int = 32
    save_reductions: Path | None = None  # write each fitted projection here (.npz)


# -- what comes out ------------------------------------------------------------------------


@dataclass
class VariantResult:
    variant: str
    reduction: str
    quantization: str
    stored_dim: int
    indexed: int
    failed: int
    bytes_per_vector: dict[str, float | None]
    timings: dict[str, float]
    labels: dict[str, float] | None = None
    copies: dict[str, float] | None = None
    # Per edit, of the copies whose first hit was not their source: how many, and how many
    # of those first hits carry the source's label (the right kind of thing, another photo).
    copy_misses: dict[str, dict[str, int]] = field(default_factory=dict)
    relative: dict[str, float] = field(default_factory=dict)  # vs the full-size reference


@dataclass
class ModelRun:
    dataset: str
    model: str
    weights: str
    quality_meaningful: bool
    dim: int
    gallery: int
    label_queries: int
    label_queries_without_relevant: int
    copy_queries: int
    timings: dict[str, float]
    variants: list[VariantResult]
    skipped: list[str] = field(default_factory=list)  # variants that cannot run, and why
    # Share of the gallery vectors' energy (sum of squares) that a projection to N
    # dimensions keeps, per reduction variant: the top N principal axes for "pca:N", and
    # N / dim, its expectation, for a random orthogonal "random:N".
    energy_kept: dict[str, float] = field(default_factory=dict)
    # What ran the model (EMBED_ENGINE=auto resolves per machine): engine, version, threads.
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetInfo:
    name: str
    source: str
    images: int
    gallery: int
    queries: int
    labels: int | None
    split: str
    copies_of: int


@dataclass
class EvalReport:
    created: str
    environment: dict[str, Any]
    options: dict[str, Any]
    edits: list[dict[str, str]]
    datasets: list[DatasetInfo]
    runs: list[ModelRun]
    notes: list[str] = field(default_factory=list)
    command: str | None = None


# -- the cache that lets each variant go through the real pipeline --------------------------


class MemoEmbedder:
    """An Embedder that computes each distinct input tensor's vector once.

    Used only by evaluation, single-threaded per call like the pipeline's embed stage:
    the pipeline preprocesses (in its decode threads) and embeds (in its caller) as usual,
    and a tensor seen before, byte for byte, gets the vector computed the first time.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.real = embedder
        self.dim: int = embedder.dim
        self.info: ModelInfo = embedder.info
        self.device = embedder.device
        self._vectors: dict[bytes, np.ndarray] = {}
        self.computed = 0

    @property
    def engine(self) -> str:
        return self.real.engine

    @property
    def decode_need(self) -> DecodeNeed:
        return self.real.decode_need

    def preprocess(self, image: Any) -> np.ndarray:
        return self.real.preprocess(image)

    def preprocess_views(self, image: Any, *, full_frame: bool) -> list[np.ndarray]:
        return self.real.preprocess_views(image, full_frame=full_frame)

    def close(self) -> None:
        """The real model belongs to the caller."""

    @staticmethod
    def _key(tensor: Any) -> bytes:
        data = np.ascontiguousarray(np.asarray(tensor, dtype=np.float32))
        return hashlib.blake2b(data.tobytes(), digest_size=20).digest()

    def embed(self, tensors: Any) -> np.ndarray:
        batch = list(tensors)
        keys = [self._key(t) for t in batch]
        missing = {k: t for k, t in zip(keys, batch, strict=True) if k not in self._vectors}
        if missing:
            vectors = self.real.embed(list(missing.values()))
            self._vectors.update(zip(missing, vectors, strict=True))
            self.computed += len(missing)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys])

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return self.embed([self.preprocess(image) for image in images])


# -- steps ---------------------------------------------------------------------------------


def load_model(choice: ModelChoice, base: dict[str, Any]) -> Embedder:
    """The model as the services would load it (device, AMP, threads from Settings)."""
    return Embedder.from_settings(load_settings(**{
        **base, "qdrant_url": None, "model_name": choice.name, "model_weights": choice.weights,
        "model_pretrained": not choice.random_weights,
    }))


def _variant_settings(base: dict[str, Any], model: ModelChoice, variant: Variant,
                      store_dir: Path, reduction_file: Path | None, roots: list[Path],
                      options: EvalOptions) -> Settings:
    return load_settings(**{
        **base,
        "qdrant_url": None,
        "qdrant_path": store_dir,
        "qdrant_collection": COLLECTION,
        "model_name": model.name,
        "model_weights": model.weights,
        "model_pretrained": not model.random_weights,
        "image_file_roots": roots,
        "batch_size": options.batch_size,
        "vector_reduction": variant.reduction,
        "vector_dim": variant.dim,
        "vector_reduction_seed": options.reduction_seed,
        "vector_reduction_file": reduction_file,
        "quantization": variant.quantization,
        "quantization_rescore": options.rescore,
        "quantization_oversampling": variant.oversampling or options.oversampling,
        "vector_indexing_threshold_kb": 1,
        "query_full_frame_view": variant.full_frame,
    })


@dataclass
class _Ingest:
    indexed: int
    failed: list[str]
    wall_s: float
    upsert_s: float


def _ingest(components: Components, gallery: Sequence[Item]) -> _Ingest:
    # The same scheduler as the workers (batch size from the settings it was given).
    started = time.perf_counter()
    report = components.ingest(
        (WorkItem(item.image_id, file_event(ImageFile(item.path, item.image_id, item.label or ""),
                                            label_from_folder=item.label is not None))
         for item in gallery),
        skip_unchanged=False)
    failed = [f"{r.item.key}: {r.error}" for r in report.failures]
    wall = time.perf_counter() - started
    return _Ingest(len(gallery) - len(failed), failed, wall, report.stage_seconds["upsert"])


def _stored_vectors(store: VectorStore, ids: Sequence[str]) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), 256):
        for image_id, stored in store.get(ids[start:start + 256], with_vector=True).items():
            if stored.vector is not None:
                vectors[image_id] = stored.vector
    return vectors


def _open_image(item: Item, settings: Settings) -> Any:
    """An original at full size, to make edited copies of (as a user edits the file)."""
    return decode_image(item.path.read_bytes(), max_pixels=settings.image_max_pixels)


def _latency(query: QueryEmbedder, store: VectorStore, items: Sequence[Item],
             limit: int) -> dict[str, float]:
    """End to end, one query at a time through the query path: read, decode, crop,
    preprocess, embed (batch 1), search."""
    times = []
    for n, item in enumerate([*items[:1], *items]):  # the first is a warm-up, not timed
        started = time.perf_counter()
        vectors = query.embed_bytes(item.path.read_bytes()).vectors
        search_store(store, vectors, limit=limit, exclude=[item.image_id])
        if n:
            times.append(time.perf_counter() - started)
    if not times:
        return {}
    ms = np.array(times) * 1000
    return {"query_ms_p50": float(np.median(ms)), "query_ms_mean": float(ms.mean()),
            "query_per_s": float(1000 / ms.mean())}


def _measure_store(shard: Path, points: int) -> dict[str, float | None]:
    """Bytes per vector of the optimised segments' files (Qdrant Edge's layout)."""
    sizes = {"float32": 0, "quantized": 0, "hnsw": 0}
    for path in shard.glob("segments/*/vector_storage/matrix.dat"):
        sizes["float32"] += path.stat().st_size
    for path in shard.glob("segments/*/vector_storage/quantized.data"):
        sizes["quantized"] += path.stat().st_size
    for path in shard.glob("segments/*/vector_index/links*.bin"):
        sizes["hnsw"] += path.stat().st_size
    if not points:
        return dict.fromkeys(sizes)
    return {k: (v / points if v else None) for k, v in sizes.items()}


def search_ids(store: VectorStore, queries: Sequence[Sequence[np.ndarray]] | np.ndarray,
               exclude: Sequence[str | None], limit: int) -> tuple[list[list[str]], list[float]]:
    """Each query's ranked image ids, and each query's search time in seconds. A query is
    its vectors: one, or one per crop (searched each and merged, as the API does)."""
    ranked, seconds = [], []
    for vectors, skip in zip(queries, exclude, strict=True):
        started = time.perf_counter()
        hits = search_store(store, list(vectors) if not isinstance(vectors, np.ndarray)
                            or vectors.ndim > 1 else vectors, limit=limit,
                            exclude=[skip] if skip else ())
        seconds.append(time.perf_counter() - started)
        ranked.append([h.image_id for h in hits])
    return ranked, seconds


# -- the run -------------------------------------------------------------------------------


@dataclass
class _Queries:
    """Everything about the queries that does not depend on the variant. Each query is
    its vectors: one per crop of it (one without a detector)."""

    label_items: list[Item]
    label_vectors: list[list[np.ndarray]]
    label_num_relevant: np.ndarray
    label_exclude: list[str | None]
    copy_sources: list[str]
    copy_edits: list[str]
    copy_vectors: list[list[np.ndarray]]
    timings: dict[str, float]
    copy_vectors_full_frame: list[list[np.ndarray]] | None = None  # for +fullframe variants


def _prepare_queries(dataset: Dataset, gallery: list[Item], stored: dict[str, np.ndarray],
                     query: QueryEmbedder, settings: Settings, options: EvalOptions,
                     edits: list[Edit], sources: list[Item], say: Progress,
                     full_frame_query: QueryEmbedder | None = None) -> _Queries:
    timings: dict[str, float] = {}
    label_items: list[Item] = []
    vectors: list[list[np.ndarray]] = []
    if options.labels and dataset.has_labels:
        fresh: list[Item] = []
        for item in dataset.queries(options.use_split):
            if item.image_id in stored:
                label_items.append(item)
                vectors.append([stored[item.image_id]])
            elif any(g.image_id == item.image_id for g in gallery):
                continue  # a gallery image that failed to index cannot query either
            else:
                fresh.append(item)
        if fresh:
            say(f"  embedding {len(fresh)} query images")
            started = time.perf_counter()
            decoded: list[Decoded] = []
            kept = []
            for item in fresh:
                try:
                    decoded.append(query.decode(item.path.read_bytes(), query.default_crop))
                    kept.append(item)
                except ImgSearchError as exc:
                    say(f"  skipping query {item.image_id}: {exc}")
            embedded = query.embed_decoded(decoded, batch_size=options.batch_size)
            timings["query_embed_img_per_s"] = len(kept) / (time.perf_counter() - started)
            label_items += kept
            vectors += [q.vectors for q in embedded]
    gallery_labels = [g.label or "" for g in gallery if g.image_id in stored]
    label_exclude = [i.image_id if i.image_id in stored else None for i in label_items]
    num_relevant = relevant_counts([i.label or "" for i in label_items], gallery_labels,
                                   [e is not None for e in label_exclude])

    copy_sources: list[str] = []
    copy_edits: list[str] = []
    copy_vectors: list[list[np.ndarray]] = []
    full_frame_vectors: list[list[np.ndarray]] = []
    if options.copies:
        originals = [s for s in sources if s.image_id in stored]
        say(f"  embedding {len(originals) * len(edits)} edited copies of {len(originals)} "
            f"originals ({', '.join(e.name for e in edits)})")
        started = time.perf_counter()
        for start in range(0, len(originals), options.batch_size):
            block = originals[start:start + options.batch_size]
            pictures = [_open_image(s, settings) for s in block]
            for edit in edits:
                copies = [make_copy(p, edit, seed=options.seed, image_id=s.image_id)
                          for p, s in zip(pictures, block, strict=True)]
                copy_vectors += [q.vectors for q in query.embed_images(
                    copies, batch_size=options.batch_size)]
                if full_frame_query is not None:
                    full_frame_vectors += [q.vectors for q in full_frame_query.embed_images(
                        copies, batch_size=options.batch_size)]
                copy_sources += [s.image_id for s in block]
                copy_edits += [edit.name] * len(block)
        if copy_vectors:
            timings["copy_embed_img_per_s"] = (
                len(copy_vectors) * (2 if full_frame_query is not None else 1)
                / (time.perf_counter() - started))
    return _Queries(label_items, vectors, num_relevant, label_exclude, copy_sources,
                    copy_edits, copy_vectors, timings,
                    full_frame_vectors if full_frame_query is not None else None)


def _run_variant(n: int, variant: Variant, *, dataset: Dataset, gallery: list[Item],
                 model: ModelChoice, memo: MemoEmbedder, base: dict[str, Any],
                 roots: list[Path], workdir: Path, options: EvalOptions,
                 reference: dict[str, np.ndarray], say: Progress,
                 after_ingest: Callable[[Components, dict[str, np.ndarray]], None] | None,
                 queries: Callable[[], _Queries]) -> VariantResult:
    store_dir = workdir / f"variant-{n}"
    reduction_file = None
    if variant.reduction == "pca":
        assert variant.dim is not None
        ids = sorted(reference)
        rng = np.random.default_rng(options.seed)
        pick = np.sort(rng.choice(len(ids), min(options.pca_sample, len(ids)), replace=False))
        fitted = fit_pca(np.stack([reference[ids[i]] for i in pick]), variant.dim)
        reduction_file = workdir / f"pca-{n}.npz"
        fitted.save(reduction_file)
        if options.save_reductions is not None:
            target = options.save_reductions / f"{dataset.name}-{model.name}-pca{variant.dim}.npz"
            fitted.save(target)
            say(f"  saved the fitted projection to {target}")
    settings = _variant_settings(base, model, variant, store_dir, reduction_file, roots, options)
    components = Components.load(settings, embedder=cast(Embedder, memo))
    try:
        before = memo.computed
        ingest = _ingest(components, gallery)
        started = time.perf_counter()
        components.store.optimize()
        optimize_s = time.perf_counter() - started
        timings = {"index_s": ingest.wall_s + optimize_s, "upsert_s": ingest.upsert_s,
                   "optimize_s": optimize_s}
        if memo.computed - before:  # this pipeline ran the model: its throughput is real
            timings["ingest_img_per_s"] = ingest.indexed / ingest.wall_s
        stored: dict[str, np.ndarray] = {}
        if after_ingest is not None:
            stored = _stored_vectors(components.store, [g.image_id for g in gallery])
            after_ingest(components, stored)
        q = queries()
        kmax = max(options.ks)
        result = VariantResult(
            variant=variant.name, reduction=variant.reduction, quantization=variant.quantization,
            stored_dim=components.store.spec.dim, indexed=ingest.indexed,
            failed=len(ingest.failed),
            bytes_per_vector=_measure_store(settings.embedded_store_path / COLLECTION / "shard",
                                            components.store.count()),
            timings=timings,
        )
        search_s: list[float] = []
        label_of = {i.image_id: i.label or "" for i in dataset.items}
        if len(q.label_items):
            ranked, elapsed = search_ids(components.store, q.label_vectors, q.label_exclude, kmax)
            rel = relevance([[label_of[r] for r in row] for row in ranked],
                            [i.label or "" for i in q.label_items], kmax)
            result.labels = retrieval_metrics(rel, q.label_num_relevant, options.ks)
            search_s += elapsed
        if len(q.copy_sources):
            copy_vectors = q.copy_vectors
            if variant.full_frame:
                assert q.copy_vectors_full_frame is not None
                copy_vectors = q.copy_vectors_full_frame
            ranked, elapsed = search_ids(components.store, copy_vectors,
                                         [None] * len(q.copy_sources), 1)
            firsts = [row[0] if row else None for row in ranked]
            copies: dict[str, float] = {}
            for edit in dict.fromkeys(q.copy_edits):
                pick = [i for i, e in enumerate(q.copy_edits) if e == edit]
                copies[edit] = top1_accuracy([firsts[i] for i in pick],
                                             [q.copy_sources[i] for i in pick])
            copies["overall"] = top1_accuracy(firsts, q.copy_sources)
            result.copies = copies
            if dataset.has_labels:
                for edit in copies:
                    missed = [i for i, (e, src) in enumerate(zip(q.copy_edits, q.copy_sources,
                                                                  strict=True))
                              if (edit == "overall" or e == edit) and firsts[i] != src]
                    result.copy_misses[edit] = {
                        "misses": len(missed),
                        "same_label": sum(label_of.get(firsts[i] or "") == label_of[
                            q.copy_sources[i]] for i in missed),
                    }
            search_s += elapsed
        if search_s:
            # The median: other processes on a shared machine make the mean jumpy.
            timings["search_ms"] = float(np.median(search_s)) * 1000
            timings["search_ms_mean"] = float(np.mean(search_s)) * 1000
        if ingest.failed:
            say(f"  {len(ingest.failed)} gallery images failed to index (first: {ingest.failed[0]})")
        return result
    finally:
        components.close()


def _relative(result: VariantResult, reference: VariantResult, ks: Sequence[int]) -> None:
    key = f"mAP@{max(ks)}"
    if result.labels and reference.labels and reference.labels.get(key):
        result.relative[key] = result.labels[key] / reference.labels[key]
    if result.copies and reference.copies and reference.copies.get("overall"):
        result.relative["copies"] = result.copies["overall"] / reference.copies["overall"]


def run_model(dataset: Dataset, model: ModelChoice, variants: Sequence[Variant],
              options: EvalOptions, base: dict[str, Any], say: Progress) -> ModelRun:
    gallery = dataset.gallery(options.use_split)
    roots = sorted({item.path.parent for item in dataset.items})
    edits = resolve_edits(options.edits) if options.copies else []
    rng = np.random.default_rng(options.seed)
    n_sources = min(options.copies_sample, len(gallery))
    sources = [gallery[i] for i in np.sort(rng.choice(len(gallery), n_sources, replace=False))]

    probe = load_settings(**{**base, "qdrant_url": None})
    say(f"{dataset.name}: loading {model.name}"
        + (" with RANDOM weights (speed only)" if model.random_weights else ""))
    embedder = load_model(model, base)
    engine = embedder.describe()
    memo = MemoEmbedder(embedder)
    ordered = [Variant()] + [v for v in dict.fromkeys(variants) if not v.is_reference]
    # A PCA has at most as many axes as it has sample vectors: refuse now, not mid-run.
    fit_size = min(options.pca_sample, len(gallery))
    skipped = [f"{v.name}: a PCA to {v.dim} dimensions needs at least {v.dim} gallery vectors "
               f"to fit on, and this run has {fit_size} (gallery {len(gallery)}, --pca-sample "
               f"{options.pca_sample})"
               for v in ordered if v.reduction == "pca" and (v.dim or 0) > fit_size]
    ordered = [v for v in ordered if not (v.reduction == "pca" and (v.dim or 0) > fit_size)]
    for reason in skipped:
        say(f"  skipping {reason}")

    state: dict[str, Any] = {}

    def after_reference(components: Components, stored: dict[str, np.ndarray]) -> None:
        state["stored"] = stored
        state["energy"] = _energy_kept(stored, ordered, options)
        # The one query path, with the gallery's detector and crop policy; the memo
        # shares the default view's vectors between the two.
        query = QueryEmbedder(memo, components.cropper, full_frame=False,
                              max_pixels=probe.image_max_pixels)
        full_frame = (QueryEmbedder(memo, components.cropper, full_frame=True,
                                    max_pixels=probe.image_max_pixels)
                      if any(v.full_frame for v in ordered) else None)
        state["queries"] = _prepare_queries(dataset, gallery, stored, query, probe, options,
                                            edits, sources, say, full_frame)
        q: _Queries = state["queries"]
        sample_pool = q.label_items or [s for s in sources if s.image_id in stored] or gallery
        pick = np.random.default_rng(options.seed).choice(
            len(sample_pool), min(options.latency_sample, len(sample_pool)), replace=False)
        say(f"  timing {len(pick)} queries end to end")
        state["latency"] = _latency(QueryEmbedder(embedder, components.cropper,
                                                  max_pixels=probe.image_max_pixels),
                                    components.store, [sample_pool[i] for i in pick],
                                    max(options.ks))

    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory(prefix="imgsearch-eval-") as tmp:
        for n, variant in enumerate(ordered):
            say(f"{dataset.name} / {model.name} / {variant.name}: indexing {len(gallery)} images")
            result = _run_variant(
                n, variant, dataset=dataset, gallery=gallery, model=model, memo=memo, base=base,
                roots=roots, workdir=Path(tmp), options=options,
                reference=state.get("stored", {}), say=say,
                after_ingest=after_reference if n == 0 else None,
                queries=lambda: state["queries"],
            )
            if results:
                _relative(result, results[0], options.ks)
            results.append(result)
            say(f"  {summary_line(result, options.ks)}")

    q = state["queries"]
    timings = {**q.timings, **state["latency"]}
    if "ingest_img_per_s" in results[0].timings:
        timings["ingest_img_per_s"] = results[0].timings["ingest_img_per_s"]
    return ModelRun(
        dataset=dataset.name, model=model.name, weights=embedder.info.weights,
        quality_meaningful=not model.random_weights, dim=embedder.dim, gallery=len(gallery),
        label_queries=int((q.label_num_relevant > 0).sum()),
        label_queries_without_relevant=int((q.label_num_relevant <= 0).sum()),
        copy_queries=len(q.copy_sources), timings=timings, variants=results, skipped=skipped,
        energy_kept=state.get("energy", {}), engine=engine,
    )


def _energy_kept(stored: dict[str, np.ndarray], variants: Sequence[Variant],
                 options: EvalOptions) -> dict[str, float]:
    """Why reductions differ: the energy each one keeps of (a sample of) the gallery."""
    dims = sorted({v.dim for v in variants if v.reduction != "none" and v.dim})
    if not dims or not stored:
        return {}
    ids = sorted(stored)
    rng = np.random.default_rng(options.seed)
    pick = np.sort(rng.choice(len(ids), min(options.pca_sample, len(ids)), replace=False))
    sample = np.stack([stored[ids[i]] for i in pick]).astype(np.float64)
    squares = np.linalg.svd(sample, compute_uv=False) ** 2
    total, full_dim = float(squares.sum()), sample.shape[1]
    kept: dict[str, float] = {}
    for n in dims:
        kept[f"pca:{n}"] = float(squares[:n].sum() / total)
        kept[f"random:{n}"] = n / full_dim
    return kept


def summary_line(result: VariantResult, ks: Sequence[int]) -> str:
    parts = [f"{result.variant}: {result.indexed} indexed"]
    if result.labels:
        k = max(ks)
        parts.append(f"mAP@{k} {result.labels[f'mAP@{k}']:.4f} R@1 {result.labels['R@1']:.4f}")
    if result.copies:
        parts.append(f"copies top-1 {result.copies['overall']:.4f}")
    return ", ".join(parts)


def environment(settings: Settings) -> dict[str, Any]:
    from importlib.metadata import version

    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "qdrant_edge": version("qdrant-edge-py"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": settings.device,
        "embed_engine": settings.embed_engine,
        "embed_amp": settings.embed_amp,
    }


def evaluate(datasets: Sequence[Dataset], models: Sequence[ModelChoice],
             variants: Sequence[Variant], options: EvalOptions, *,
             base: dict[str, Any] | None = None, say: Progress = lambda _: None) -> EvalReport:
    """Run every model and variant on every dataset. ``base`` holds Settings overrides."""
    base = dict(base or {})
    infos, runs, notes = [], [], []
    for original in datasets:
        dataset = original.subset(options.limit, options.seed) if options.limit else original
        gallery = dataset.gallery(options.use_split)
        do_labels = options.labels and dataset.has_labels
        if options.labels and not dataset.has_labels:
            notes.append(f"{dataset.name}: no labels, so no label retrieval metrics")
        if not (do_labels or options.copies):
            raise ValueError(f"{dataset.name} has no labels: run it with --copies")
        infos.append(DatasetInfo(
            name=dataset.name, source=str(dataset.source), images=len(dataset.items),
            gallery=len(gallery),
            queries=len(dataset.queries(options.use_split)) if do_labels else 0,
            labels=len({i.label for i in dataset.items}) if dataset.has_labels else None,
            split="train/test" if options.use_split and dataset.has_split else "all vs all",
            copies_of=min(options.copies_sample, len(gallery)) if options.copies else 0,
        ))
        for model in models:
            run = run_model(dataset, model, variants, options, base, say)
            notes += [f"{dataset.name} / {model.name}: skipped {reason}" for reason in run.skipped]
            runs.append(run)
    probe = load_settings(**{**base, "qdrant_url": None})
    return EvalReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment(probe),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        edits=[{"name": e.name, "description": e.description} for e in resolve_edits(options.edits)]
        if options.copies else [],
        datasets=infos, runs=runs, notes=notes,
    )
