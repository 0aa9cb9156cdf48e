"""The retrieval metrics against examples worked out by hand (see the comments)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from imgsearch.evaluation.metrics import (
    relevance,
    relevant_counts,
    retrieval_metrics,
    top1_accuracy,
)
from imgsearch.evaluation.runner import Variant, search_ids
from shared.store.base import CollectionSpec, PointRecord
from shared.store.edge import EdgeStore

# Gallery: three A, two B, one C.
GALLERY = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C"}
KS = (1, 5, 10)


def metrics_for(rankings: list[list[str]], query_labels: list[str],
                query_in_gallery: list[bool]) -> dict[str, float]:
    rel = relevance([[GALLERY[i] for i in r] for r in rankings], query_labels, 10)
    counts = relevant_counts(query_labels, list(GALLERY.values()), query_in_gallery)
    return retrieval_metrics(rel, counts, KS)


def test_hand_computed_example() -> None:
    rankings = [
        # q1, label A, not indexed; 3 relevant. Relevant at ranks 1, 3, 6.
        #   AP@1 = 1; AP@5 = (1/1 + 2/3) / 2 = 5/6; AP@10 = (1 + 2/3 + 3/6) / 3 = 13/18
        #   HR@1 = 1/3; HR@5 = 2/3; HR@10 = 3/3
        ["a1", "b1", "a2", "b2", "c1", "a3"],
        # q2, label B, not indexed; 2 relevant. Relevant at ranks 3 and 6.
        #   AP@1 = 0; AP@5 = (1/3) / 1 = 1/3; AP@10 = (1/3 + 2/6) / 2 = 1/3
        #   HR@1 = 0; HR@5 = 1/2; HR@10 = 1
        ["a1", "a2", "b2", "a3", "c1", "b1"],
        # q3 is c1 itself: no other C, so no relevant item: left out of every average.
        ["a1", "a2", "a3", "b1", "b2"],
        # q4 is a1 itself (excluded from its ranking); 2 relevant. Relevant at ranks 2, 4.
        #   AP@1 = 0; AP@5 = AP@10 = (1/2 + 2/4) / 2 = 1/2; HR@1 = 0; HR@5 = HR@10 = 1
        ["b1", "a2", "c1", "a3", "b2"],
    ]
    got = metrics_for(rankings, ["A", "B", "C", "A"], [False, False, True, True])
    expected = {
        "mAP@1": (1 + 0 + 0) / 3, "mAP@5": (5 / 6 + 1 / 3 + 1 / 2) / 3,
        "mAP@10": (13 / 18 + 1 / 3 + 1 / 2) / 3,
        "mHR@1": (1 / 3 + 0 + 0) / 3, "mHR@5": (2 / 3 + 1 / 2 + 1) / 3, "mHR@10": 1.0,
        "R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key
    # The fractions, as a reader would check them.
    assert math.isclose(got["mAP@5"], 5 / 9) and math.isclose(got["mAP@10"], 14 / 27)
    assert math.isclose(got["mHR@5"], 13 / 18)


def test_perfect_and_hopeless_rankings() -> None:
    perfect = metrics_for([["a1", "a2", "a3", "b1"]], ["A"], [False])
    assert perfect["mAP@10"] == 1.0 and perfect["mHR@10"] == 1.0 and perfect["R@1"] == 1.0
    assert math.isclose(perfect["mHR@1"], 1 / 3)
    hopeless = metrics_for([["b1", "b2", "c1"]], ["A"], [False])
    assert hopeless["mAP@10"] == 0.0 and hopeless["mHR@10"] == 0.0 and hopeless["R@1"] == 0.0


def test_no_query_with_a_relevant_item_gives_no_metrics() -> None:
    assert metrics_for([["a1"]], ["C"], [True]) == {}


def test_rankings_shallower_than_k_are_refused() -> None:
    with pytest.raises(ValueError, match="@10"):
        retrieval_metrics(np.zeros((1, 5), dtype=bool), np.array([1]), KS)


def test_top1_accuracy() -> None:
    assert top1_accuracy(["x", "y", None, "z"], ["x", "q", "r", "z"]) == 0.5


def _at(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    return np.array([math.cos(angle), math.sin(angle)], dtype=np.float32)


def test_rankings_from_a_real_store_score_as_computed_by_hand(tmp_path: Path) -> None:
    """Vectors on a circle, so the store's ranking is known: a1 1°, b1 2°, a2 3°, b2 4°,
    c1 5°, a3 6°. The search path the evaluation uses must rank and exclude as expected."""
    angles = {"a1": 1, "b1": 2, "a2": 3, "b2": 4, "c1": 5, "a3": 6}
    store = EdgeStore(tmp_path, CollectionSpec("circle", 2))
    try:
        store.upsert([PointRecord(i, _at(a), {"image_id": i, "metadata": {}})
                      for i, a in angles.items()])
        # q1 at 0° (not indexed): a1 b1 a2 b2 c1 a3, as in the hand-computed example.
        # a1 as a query excludes itself: b1 a2 b2 c1 a3, relevant at ranks 2 and 5:
        #   AP@5 = AP@10 = (1/2 + 2/5) / 2 = 9/20; HR@5 = HR@10 = 1; AP@1 = HR@1 = R@1 = 0.
        ranked, _ = search_ids(store, np.stack([_at(0), _at(1)]), [None, "a1"], 10)
    finally:
        store.close()
    assert ranked == [["a1", "b1", "a2", "b2", "c1", "a3"], ["b1", "a2", "b2", "c1", "a3"]]
    got = metrics_for(ranked, ["A", "A"], [False, True])
    expected = {
        "mAP@1": 1 / 2, "mAP@5": (5 / 6 + 9 / 20) / 2, "mAP@10": (13 / 18 + 9 / 20) / 2,
        "mHR@1": (1 / 3) / 2, "mHR@5": (2 / 3 + 1) / 2, "mHR@10": 1.0, "R@1": 1 / 2,
    }
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-9), key


@pytest.mark.parametrize(("text", "name", "dim", "quantization"), [
    ("full", "full", None, "none"),
    ("random:320", "random:320", 320, "none"),
    ("pca:512+int8", "pca:512+int8", 512, "int8"),
    ("binary", "full+binary", None, "binary"),
    ("binary:x8", "full+binary:x8", None, "binary"),
    ("pca:320+int8:x2.5", "pca:320+int8:x2.5", 320, "int8"),
    ("random:1280+binary", "random:1280+binary", 1280, "binary"),
])
def test_variant_names_round_trip(text: str, name: str, dim: int | None,
                                  quantization: str) -> None:
    variant = Variant.parse(text)
    assert (variant.name, variant.dim, variant.quantization) == (name, dim, quantization)
    assert Variant.parse(variant.name) == variant


@pytest.mark.parametrize("text", ["pca", "random:0", "int4", "pca:x", "svd:10", "binary:8",
                                  "int8:x0.5", "binary:xx"])
def test_bad_variants_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read variant"):
        Variant.parse(text)
