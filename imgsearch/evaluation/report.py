"""An EvalReport as a terminal table, JSON, and Markdown (docs/quality.md is one)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from imgsearch.evaluation.edits import EDITS
from imgsearch.evaluation.runner import EvalReport, ModelRun, VariantResult

NOT_MEANINGFUL = "n/m"
# Goals from the issue that asked for this report.
QUARTER_SIZE_KEEP = 0.98
EDIT_TOP1 = 0.95
HARD_EDITS = frozenset({"combined"})


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _bytes(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _quality(run: ModelRun, value: float | None, digits: int = 3) -> str:
    return _f(value, digits) if run.quality_meaningful else NOT_MEANINGFUL


def _ks(report: EvalReport) -> list[int]:
    return list(report.options["ks"])


def goals(report: EvalReport) -> list[dict[str, Any]]:
    """The issue's targets, checked against this run (real-weight models only)."""
    out: list[dict[str, Any]] = []
    kmax = max(_ks(report))
    for run in report.runs:
        if not run.quality_meaningful:
            continue
        for v in run.variants:
            key = f"mAP@{kmax}"
            if v.reduction != "none" and v.stored_dim * 4 == run.dim and key in v.relative:
                out.append({
                    "dataset": run.dataset, "model": run.model, "variant": v.variant,
                    "goal": f"quarter-size vectors keep >= {QUARTER_SIZE_KEEP} of full {key}",
                    "value": v.relative[key], "met": v.relative[key] >= QUARTER_SIZE_KEEP,
                })
        # Copy detection with full-size vectors: plain queries, and QUERY_FULL_FRAME_VIEW's.
        for v in run.variants:
            if v is not run.variants[0] and v.variant != "full+fullframe":
                continue
            for edit, top1 in (v.copies or {}).items():
                if edit == "overall" or edit in HARD_EDITS:
                    continue
                out.append({
                    "dataset": run.dataset, "model": run.model, "variant": v.variant,
                    "goal": f"top-1 source accuracy >= {EDIT_TOP1} for {edit}",
                    "value": top1, "met": top1 >= EDIT_TOP1,
                })
    return out


def to_json(report: EvalReport) -> str:
    data = dataclasses.asdict(report)
    data["goals"] = goals(report)
    for run in data["runs"]:
        if not run["quality_meaningful"]:
            run["note"] = "random weights: quality columns are meaningless, speed columns only"
    return json.dumps(data, indent=2, sort_keys=False)


# -- terminal ------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _label_cells(run: ModelRun, v: VariantResult, ks: Sequence[int]) -> list[str]:
    labels = v.labels or {}
    cells = [_quality(run, labels.get(f"mAP@{k}")) for k in ks]
    cells += [_quality(run, labels.get(f"mHR@{k}")) for k in ks]
    cells.append(_quality(run, labels.get("R@1")))
    cells.append(_quality(run, v.relative.get(f"mAP@{max(ks)}")))
    return cells


def terminal(report: EvalReport) -> str:
    ks = _ks(report)
    out: list[str] = []
    for info in report.datasets:
        runs = [r for r in report.runs if r.dataset == info.name]
        out.append(f"\n{info.name}: {info.gallery} indexed, {info.split}"
                   + (f", {info.labels} labels" if info.labels else ""))
        headers = ["model", "variant", "dim", "B/vec f32", "B/vec quant"]
        if any(v.labels for r in runs for v in r.variants):
            headers += [f"mAP@{k}" for k in ks] + [f"mHR@{k}" for k in ks] + ["R@1", "vs full"]
        if any(v.copies for r in runs for v in r.variants):
            headers += ["copies top-1"]
        headers += ["ingest img/s", "search ms"]
        rows = []
        for run in runs:
            for v in run.variants:
                row = [run.model, v.variant, str(v.stored_dim),
                       _bytes(v.bytes_per_vector.get("float32")),
                       _bytes(v.bytes_per_vector.get("quantized"))]
                if f"mAP@{ks[0]}" in headers:
                    row += _label_cells(run, v, ks)
                if "copies top-1" in headers:
                    row.append(_quality(run, (v.copies or {}).get("overall")))
                row += [_rate(v.timings.get("ingest_img_per_s")), _f(v.timings.get("search_ms"), 2)]
                rows.append(row)
        out += _table(headers, rows)
        copy_runs = [r for r in runs if r.variants[0].copies]
        if copy_runs:
            edits = [e for e in copy_runs[0].variants[0].copies or {} if e != "overall"]
            out.append("")
            out += _table(["model", "variant", *edits, "overall"], [
                [run.model, v.variant, *(_quality(run, (v.copies or {}).get(e), 2)
                                         for e in [*edits, "overall"])]
                for run in copy_runs for v in run.variants
            ])
        for run in runs:
            t = run.timings
            out.append(
                f"{run.model}: ingest {_rate(t.get('ingest_img_per_s'))} img/s (fetch, decode, "
                f"embed, upsert); query p50 {_f(t.get('query_ms_p50'), 1)} ms end to end"
                + ("" if run.quality_meaningful else "; RANDOM weights: quality n/m")
            )
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out).lstrip("\n")


# -- Markdown ------------------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text: int = 2) -> list[str]:
    """A Markdown table; the first ``text`` columns are left-aligned, the rest numbers."""
    return ["| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i < text else "---:" for i in range(len(headers))) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _weights(run: ModelRun) -> str:
    return run.weights if run.quality_meaningful else "random (speed only)"


INTRO = """\
How well, how fast and how small: retrieval quality, throughput and memory per vector for
a model and a way of storing its vectors, measured on real photos by `imgsearch eval`.
This file is its output; rerun the command below to refresh it (or point it at your own
data before re-indexing millions of images).
"""

METHOD = """\
## How it is measured

* **Indexing.** Each dataset's gallery is indexed into a fresh embedded store (Qdrant
  Edge, in a temporary directory) through the real ingest pipeline: file:// fetch,
  decode, the model's own preprocessing, embedding, upsert, then `optimize()`. Stores are
  built with `VECTOR_INDEXING_THRESHOLD_KB=1` so that every segment gets its HNSW index and
  its quantized copy, as a large collection's segments would: recall includes HNSW's
  approximation, and quantization is really in use. The model runs once per image; later
  variants take its vectors from a cache keyed by the exact input tensor, so their
  timings are those of the store.
* **Label retrieval.** Every query image searches the gallery with its own id excluded.
  A query that is a gallery image uses its stored vector (as search by image id does).
  Relevant = same label. *mHR@k* (hit ratio, recall@k): relevant items in the top k over
  all of the query's relevant items. *mAP@k*: the mean of precision@i over the ranks
  i <= k that hold a relevant item (0 if none). *R@1*: the first hit is relevant.
  Averaged over the queries that have at least one relevant item.
* **Find the source.** Originals are indexed; edited copies of a seeded sample of them
  query; *top-1* is how often the original comes first. The edits are fixed (see the table
  below) and seeded per image, so reruns make the same copies. Qdrant builds its HNSW
  graphs in parallel, so approximate search can move the third decimal between runs.
  `+fullframe` rows query with `QUERY_FULL_FRAME_VIEW`: each copy is embedded twice, with
  the model's preprocessing and without its centre crop (timm `crop_pct=1.0`), and the
  normalised sum of the two vectors searches. The gallery is the same.
* **Reductions** (`VECTOR_REDUCTION`, `VECTOR_DIM`): `random:N` is a seeded random
  orthogonal projection; `pca:N` projects on the top principal axes (uncentred) of up to
  2,000 gallery vectors. The matrix is stored with the collection; queries go through the
  same store, so they always use it.
* **Quantization** (`QUANTIZATION`): Qdrant's int8 scalar or 1-bit binary quantization of
  the stored vectors, searched with rescoring by the float32 originals
  (`QUANTIZATION_RESCORE`, `QUANTIZATION_OVERSAMPLING`). Binary keeps one bit per
  dimension, the sign; pooled CNN features come after a ReLU and are all >= 0, so binary
  needs a rotation first (`random:<full dim>+binary`, or a PCA).
* **Bytes per vector** are measured from the store's files: *float32* is the original
  vectors (kept for rescoring; with quantization they may live on disk), *quantized* the
  copy that search scans (kept in RAM), *HNSW* the graph's links.
* **Speed.** *ingest img/s*: the whole pipeline, with the model, on this machine.
  *search ms*: the median store query, single-threaded, vectors already computed. *query
  ms*: one query end to end (read, decode, embed at batch 1, search). Timings taken on a
  machine shared with other work move a lot between runs (ingest img/s by 2-4x): compare
  rows of one run, and rerun on your own hardware for absolute numbers.
"""

PRODUCTION = """\
## Using a variant in production

The collection is created with its variant and keeps it; every process that opens it
must be configured the same way (a mismatch stops it with a message saying what the
collection was built with).

| variant | settings when the collection is created |
|---|---|
| `random:N` | `VECTOR_REDUCTION=random VECTOR_DIM=N` (`VECTOR_REDUCTION_SEED`, default 0) |
| `pca:N` | `VECTOR_REDUCTION=pca VECTOR_DIM=N VECTOR_REDUCTION_FILE=<fitted .npz>`; fit it on your gallery with `imgsearch eval DATASET --variants pca:N --save-reductions DIR`. Later processes need only `VECTOR_REDUCTION=pca VECTOR_DIM=N`: the projection is read from the collection. |
| `int8`, `binary` | `QUANTIZATION=int8` or `binary`; `QUANTIZATION_RESCORE` (default true) and `QUANTIZATION_OVERSAMPLING` (default 4 for binary) apply per query |
| `random:1280+binary` | `VECTOR_REDUCTION=random VECTOR_DIM=1280 QUANTIZATION=binary`: a rotation, then binary |
| `+fullframe` | `QUERY_FULL_FRAME_VIEW=true` on the query API; a query setting, the collection does not change. It costs a second forward pass per query. |

Qdrant builds the HNSW index and the quantized copy of a segment once it holds more than
`VECTOR_INDEXING_THRESHOLD_KB` of vectors (Qdrant's default: 10 MB, about 2,000 vectors of
1,280 dimensions); smaller collections are scanned exactly in float32.
"""


def _energy_finding(run: ModelRun) -> list[str]:
    """Why PCA and random projection differ, from this gallery's own vectors."""
    dims = sorted({int(k.split(":")[1]) for k in run.energy_kept})
    if not dims:
        return []
    kept = ", ".join(f"{n}: PCA {run.energy_kept[f'pca:{n}']:.1%}, random "
                     f"{run.energy_kept[f'random:{n}']:.1%}" for n in dims)
    return [
        f"{run.model}: share of the gallery vectors' energy a projection keeps ({kept}). "
        "The features use few directions, which PCA keeps; a random projection keeps the "
        "same share (N/dim) of every direction, and the cosine similarities that separate "
        "close neighbours move with what it drops.",
        "",
    ]


def _copy_findings(run: ModelRun) -> list[str]:
    """What the full-size reference says about the hard edits, in words, from its numbers."""
    ref = run.variants[0]
    copies = ref.copies or {}
    lines = []
    parts = [e for e in ("half", "crop80", "jpeg30") if e in copies]
    if "combined" in copies and parts:
        alone = ", ".join(f"{e} {copies[e]:.3f}" for e in parts)
        if copies["combined"] < min(copies[e] for e in parts):
            lines.append(
                f"The combined edit reaches {copies['combined']:.3f}, below each of its parts "
                f"alone ({alone}): the copy shows the centre 80% of the photo at half its "
                "resolution (e.g. a 227-px square becomes 91 px) with JPEG q30 blocks; "
                "preprocessing scales that up to the model's input and keeps its centre, so "
                "the query sees about 70% of the original's width at half its resolution."
            )
        else:
            lines.append(f"The combined edit reaches {copies['combined']:.3f} (its parts alone: "
                         f"{alone}).")
    misses = ref.copy_misses
    hard = [e for e in copies if e != "overall" and misses.get(e, {}).get("misses")]
    if hard:
        described = [f"{e} {misses[e]['same_label']}/{misses[e]['misses']}" for e in hard]
        lines.append(
            "Misses whose first hit carries the source's label, per edit: "
            + ", ".join(described) + ". A miss of that kind found another photo of the same "
            "label: the embedding kept what the image shows, but too little of what makes "
            "this photo differ from its neighbours."
        )
    return [*lines, ""] if lines else []


def markdown(report: EvalReport, command: str | None = None) -> str:
    ks = _ks(report)
    kmax = max(ks)
    out = ["# Retrieval quality, speed and memory", "", INTRO]
    command = command or report.command
    if command:
        out += ["Produced by:", "", "```", command, "```", ""]
    env = report.environment
    out.append(
        f"Run {report.created} on {env.get('cpu_count')} CPU cores ({env.get('cpu')}), "
        f"device {env.get('device')} (AMP {env.get('embed_amp', 'off')}), torch "
        f"{env.get('torch')}, timm {env.get('timm')}, "
        f"qdrant-edge {env.get('qdrant_edge')}."
    )
    out.append("")

    checked = goals(report)
    if checked:
        out += ["## Goals", ""]
        out += _md_table(["dataset", "model", "variant", "goal", "measured", "met"], [
            [g["dataset"], g["model"], g["variant"], g["goal"], f"{g['value']:.3f}",
             "yes" if g["met"] else "**no**"] for g in checked
        ], text=4)

    for info in report.datasets:
        runs = [r for r in report.runs if r.dataset == info.name]
        out += [f"## {info.name}", ""]
        facts = [f"{info.images:,} images from `{info.source}`", f"{info.gallery:,} indexed"]
        if info.labels:
            facts.append(f"{info.labels} labels, {info.split}")
        if info.copies_of:
            facts.append(f"edited copies of {info.copies_of:,} originals")
        out += ["; ".join(facts) + ".", ""]

        if any(v.labels for r in runs for v in r.variants):
            out += ["### Label retrieval", ""]
            headers = ["model", "variant", "dim", "bytes/vector float32", "quantized", "HNSW",
                       *(f"mAP@{k}" for k in ks), *(f"mHR@{k}" for k in ks), "R@1",
                       f"mAP@{kmax} vs full", "search ms"]
            rows = []
            for run in runs:
                for v in run.variants:
                    b = v.bytes_per_vector
                    rows.append([f"{run.model}", v.variant, str(v.stored_dim),
                                 _bytes(b.get("float32")), _bytes(b.get("quantized")),
                                 _bytes(b.get("hnsw")), *_label_cells(run, v, ks),
                                 _f(v.timings.get("search_ms"), 2)])
            out += _md_table(headers, rows)
            for run in runs:
                if run.label_queries_without_relevant:
                    out.append(f"{run.model}: {run.label_queries_without_relevant} queries "
                               "have no relevant gallery item and are left out.")
            out.append("")
            for run in runs:
                out += _energy_finding(run)

        copy_runs = [r for r in runs if r.variants[0].copies]
        if copy_runs:
            edits = [e for e in copy_runs[0].variants[0].copies or {} if e != "overall"]
            out += ["### Find the source: top-1 accuracy per edit", ""]
            headers = ["model", "variant", *edits, "overall", "overall vs full"]
            rows = [[run.model, v.variant,
                     *(_quality(run, (v.copies or {}).get(e)) for e in [*edits, "overall"]),
                     _quality(run, v.relative.get("copies"))]
                    for run in copy_runs for v in run.variants]
            out += _md_table(headers, rows)
            out += [f"{run.model}: {run.copy_queries:,} edited copies." for run in copy_runs]
            out.append("")
            for run in copy_runs:
                if run.quality_meaningful:
                    out += _copy_findings(run)

        out += ["### Speed", ""]
        rows = []
        for run in runs:
            t = run.timings
            rows.append([run.model, _weights(run), str(run.dim),
                         _rate(t.get("ingest_img_per_s")), _f(t.get("query_ms_p50"), 1),
                         _f(t.get("query_ms_mean"), 1), _rate(t.get("query_per_s")),
                         _rate(t.get("copy_embed_img_per_s") or t.get("query_embed_img_per_s"))])
        out += _md_table(["model", "weights", "dim", "ingest img/s", "query ms p50",
                          "query ms mean", "queries/s (1 at a time)", "batched query embed img/s"],
                         rows)
        if any(not r.quality_meaningful for r in runs):
            out += [f"`{NOT_MEANINGFUL}`: not meaningful, the model has random weights here "
                    "(no local weights file); only its speed columns mean something.", ""]

    out.append(METHOD)
    if report.edits:
        out += ["### The edits", ""]
        out += _md_table(["name", "edit", "exactly"],
                         [[e["name"], e["description"], EDITS[e["name"]].detail]
                          for e in report.edits], text=3)
        out += ["The code is `imgsearch/evaluation/edits.py`; the seed is "
                f"{report.options['seed']} (`--seed`).", ""]
    if report.notes:
        out += ["### Notes", "", *(f"* {n}" for n in report.notes), ""]
    out.append(PRODUCTION)
    return "\n".join(out).rstrip() + "\n"
