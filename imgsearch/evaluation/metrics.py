"""Retrieval metrics as the seed tutorials define them (see ../shared/README.md).

For one query, with ``relevance[i]`` true when the item at rank ``i + 1`` is relevant
(same label, the query itself excluded) and ``num_relevant`` such items in the gallery:

* hit ratio@k (recall@k): relevant items in the top k / ``num_relevant``; mHR@k averages it;
* average precision@k: the mean of precision@i over the ranks i <= k that hold a relevant
  item (0 when none does); mAP@k averages it;
* R@k: 1 when at least one of the top k is relevant; so R@1 is top-1 accuracy.

Queries without any relevant item in the gallery are left out of the averages: no
ranking can score on them. Callers report how many there were.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def relevance(ranked_labels: Sequence[Sequence[str]], query_labels: Sequence[str],
              depth: int) -> np.ndarray:
    """(Q, depth) booleans: is rank i of query q's ranking relevant? Short rankings pad False."""
    out = np.zeros((len(query_labels), depth), dtype=bool)
    for q, (ranked, label) in enumerate(zip(ranked_labels, query_labels, strict=True)):
        for i, got in enumerate(ranked[:depth]):
            out[q, i] = got == label
    return out


def relevant_counts(query_labels: Sequence[str], gallery_labels: Sequence[str],
                    query_in_gallery: Sequence[bool]) -> np.ndarray:
    """Relevant gallery items per query: same label, minus the query when it is indexed."""
    counts = Counter(gallery_labels)
    return np.array(
        [counts[label] - int(inside) for label, inside in zip(query_labels, query_in_gallery,
                                                               strict=True)],
        dtype=np.int64,
    )


def average_precision(rel: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query for a (Q, >=k) relevance matrix."""
    top = rel[:, :k].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    hits = top.sum(axis=1)
    return np.divide((precision * top).sum(axis=1), hits, out=np.zeros_like(hits),
                     where=hits > 0)


def hit_ratio(rel: np.ndarray, k: int, num_relevant: np.ndarray) -> np.ndarray:
    """HR@k (recall@k) per query; ``num_relevant`` must be > 0."""
    return rel[:, :k].sum(axis=1) / num_relevant


def retrieval_metrics(rel: np.ndarray, num_relevant: np.ndarray,
                      ks: Sequence[int]) -> dict[str, float]:
    """mAP@k, mHR@k and R@k over the queries that have a relevant item."""
    if rel.shape[1] < max(ks):
        raise ValueError(f"rankings are {rel.shape[1]} deep; metrics @{max(ks)} need more")
    keep = num_relevant > 0
    rel, num_relevant = rel[keep], num_relevant[keep]
    if not len(rel):
        return {}
    out: dict[str, float] = {}
    for k in ks:
        out[f"mAP@{k}"] = float(average_precision(rel, k).mean())
        out[f"mHR@{k}"] = float(hit_ratio(rel, k, num_relevant).mean())
        out[f"R@{k}"] = float(rel[:, :k].any(axis=1).mean())
    return out


def top1_accuracy(first_hits: Sequence[str | None], sources: Sequence[str]) -> float:
    """Fraction of queries whose first hit is their source."""
    if not sources:
        raise ValueError("no queries")
    right = sum(hit == source for hit, source in zip(first_hits, sources, strict=True))
    return right / len(sources)
