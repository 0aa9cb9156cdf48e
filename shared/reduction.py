"""Dimension reduction of embeddings: a linear map stored with the collection.

Two methods, both a matrix ``M`` (in_dim x out_dim) with orthonormal columns:

* ``random``  a seeded random orthogonal projection: a Gaussian matrix orthonormalised by
              QR. Orthonormal columns keep ~0.5 points more mAP than a plain Gaussian or
              +-1 matrix at a quarter of the dimensions (measured on the birds set).
              ``out_dim == in_dim`` is a random rotation: no reduction, but it spreads the
              energy over signed components, which binary quantization needs (ReLU
              features are all >= 0, so their sign bits carry almost nothing).
* ``pca``     the top right-singular vectors of a sample of gallery vectors, uncentred
              (a truncated SVD): it keeps the dot products that cosine search uses, and
              measured 0.1-0.3 points of mAP better than centred PCA on the birds set.

A vector is reduced as ``normalise(x @ M)``. Because ``M.T @ M = I``, a stored (reduced)
vector ``y`` maps back into the embedder's space as ``M @ y``, and reducing that again
gives ``y`` exactly: a store that speaks the embedder's space on both sides stays
consistent (search by a stored image's vector works).

The matrix itself, not just the seed, is what a collection keeps: QR and SVD go through
BLAS/LAPACK, whose last bits differ between builds, so regenerating from the seed on
another machine is not guaranteed to give the same matrix. ``fingerprint`` is a hash of
the exact matrix.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import Settings
from shared.errors import ConfigError

METHODS = ("random", "pca")
# A fitted projection must map orthonormally (see the module docstring); allow float32 noise.
_ORTHONORMAL_TOLERANCE = 1e-4


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _fix_signs(columns: np.ndarray) -> np.ndarray:
    """Make each column's largest-magnitude entry positive: one canonical sign per axis."""
    rows = np.argmax(np.abs(columns), axis=0)
    signs = np.sign(columns[rows, np.arange(columns.shape[1])])
    signs[signs == 0] = 1.0
    return columns * signs


@dataclass(frozen=True, eq=False)
class Reduction:
    method: str
    matrix: np.ndarray  # (in_dim, out_dim) float32, orthonormal columns
    seed: int | None = None  # random projections
    fitted_on: int | None = None  # PCA: how many vectors the fit saw
    _fingerprint: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown reduction method {self.method!r}; use one of {METHODS}")
        matrix = np.ascontiguousarray(self.matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] > matrix.shape[0] or matrix.shape[1] < 1:
            raise ConfigError(
                f"a reduction matrix must be (in_dim, out_dim) with 1 <= out_dim <= in_dim, "
                f"not {matrix.shape}"
            )
        gram = matrix.T.astype(np.float64) @ matrix.astype(np.float64)
        error = float(np.abs(gram - np.eye(matrix.shape[1])).max())
        if error > _ORTHONORMAL_TOLERANCE:
            raise ConfigError(
                f"the reduction matrix's columns are not orthonormal (max |M^T M - I| = "
                f"{error:.2e}); refit it with shared.reduction (random_projection / fit_pca)"
            )
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        digest = hashlib.sha256(f"{self.method}:{matrix.shape}:".encode())
        digest.update(matrix.astype("<f4").tobytes())
        object.__setattr__(self, "_fingerprint", digest.hexdigest()[:16])

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(N, in_dim) or (in_dim,) embedder vectors to L2-normalised (N, out_dim)/(out_dim,)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[-1] != self.in_dim:
            raise ConfigError(
                f"this {self.method} reduction maps {self.in_dim}-d vectors, got "
                f"{vectors.shape[-1]}-d ones: the model does not match the collection"
            )
        return _normalise(vectors @ self.matrix)

    def lift(self, reduced: np.ndarray) -> np.ndarray:
        """Stored (reduced) vectors back into the embedder's space: ``apply(lift(y)) == y``."""
        reduced = np.asarray(reduced, dtype=np.float32)
        return _normalise(reduced @ self.matrix.T)

    # -- identity and persistence ----------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What two collections must share to hold comparable vectors."""
        ident: dict[str, Any] = {"method": self.method, "in_dim": self.in_dim,
                                 "out_dim": self.out_dim}
        if self.method == "random":
            ident["seed"] = self.seed
        else:  # a fit depends on its sample: only the exact matrix identifies it
            ident["fingerprint"] = self.fingerprint
        return ident

    def to_metadata(self) -> dict[str, Any]:
        """Everything needed to rebuild it, as JSON (the matrix as base64 float32 LE)."""
        return {
            "identity": self.identity(),
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "fitted_on": self.fitted_on,
            "matrix_b64": base64.b64encode(self.matrix.astype("<f4").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Reduction:
        ident = meta.get("identity") or {}
        try:
            raw = base64.b64decode(meta["matrix_b64"], validate=True)
            matrix = np.frombuffer(raw, dtype="<f4").reshape(ident["in_dim"], ident["out_dim"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"stored reduction metadata is incomplete or corrupt: {exc}") from exc
        reduction = cls(ident["method"], matrix, seed=meta.get("seed"),
                        fitted_on=meta.get("fitted_on"))
        if reduction.fingerprint != meta.get("fingerprint"):
            raise ConfigError(
                f"stored reduction matrix does not match its fingerprint "
                f"({reduction.fingerprint} != {meta.get('fingerprint')}): it was altered"
            )
        return reduction

    def save(self, path: Path) -> None:
        """Write a .npz that ``load`` (and VECTOR_REDUCTION_FILE) reads back exactly."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(handle, matrix=self.matrix, method=np.array(self.method),
                     seed=np.array(-1 if self.seed is None else self.seed),
                     fitted_on=np.array(-1 if self.fitted_on is None else self.fitted_on))

    @classmethod
    def load(cls, path: Path) -> Reduction:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"VECTOR_REDUCTION_FILE={path} does not exist or is not a file")
        try:
            with np.load(path, allow_pickle=False) as data:
                seed, fitted = int(data["seed"]), int(data["fitted_on"])
                return cls(str(data["method"]), data["matrix"],
                           seed=None if seed < 0 else seed,
                           fitted_on=None if fitted < 0 else fitted)
        except (KeyError, ValueError, OSError) as exc:
            raise ConfigError(
                f"{path} is not a reduction file written by imgsearch ({exc}); make one with "
                "`imgsearch eval DATASET --variants pca:N --save-reductions DIR`"
            ) from exc


def random_projection(in_dim: int, out_dim: int, seed: int) -> Reduction:
    """A seeded random projection with orthonormal columns."""
    if not 1 <= out_dim <= in_dim:
        raise ConfigError(f"VECTOR_DIM must be between 1 and the model's {in_dim}, not {out_dim}")
    gaussian = np.random.default_rng(seed).standard_normal((in_dim, out_dim))
    q, r = np.linalg.qr(gaussian)
    # QR's signs are arbitrary; fixing diag(R) > 0 makes Q the unique Haar-distributed one.
    q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))
    return Reduction("random", q.astype(np.float32), seed=seed)


def fit_pca(sample: np.ndarray, out_dim: int) -> Reduction:
    """The top ``out_dim`` principal axes (uncentred) of a sample of gallery vectors."""
    sample = np.asarray(sample, dtype=np.float64)
    if sample.ndim != 2:
        raise ConfigError(f"a PCA sample must be (N, dim), not {sample.shape}")
    count, in_dim = sample.shape
    if not 1 <= out_dim <= in_dim:
        raise ConfigError(f"PCA dimension must be between 1 and {in_dim}, not {out_dim}")
    if count < out_dim:
        raise ConfigError(
            f"PCA to {out_dim} dimensions needs at least {out_dim} sample vectors, got {count}"
        )
    _, _, vt = np.linalg.svd(sample, full_matrices=False)
    axes = _fix_signs(vt[:out_dim].T)
    return Reduction("pca", axes.astype(np.float32), fitted_on=count)


def reduction_spec(settings: Settings, in_dim: int) -> dict[str, Any] | None:
    """What ``CollectionSpec.reduction`` says for these settings and a model of ``in_dim``.

    A random projection is regenerated from its seed (enough to create the collection; an
    existing one is then used with its own stored matrix). A PCA needs
    VECTOR_REDUCTION_FILE to create a collection; without it the spec carries only the
    identity, which opens an existing collection and refuses to create one.
    """
    method = settings.vector_reduction
    if method == "none":
        return None
    if settings.vector_reduction_file is not None:
        reduction = Reduction.load(settings.vector_reduction_file)
        problems = []
        if reduction.method != method:
            problems.append(f"it holds a {reduction.method} projection, not {method}")
        if reduction.in_dim != in_dim:
            problems.append(f"it maps {reduction.in_dim}-d vectors, the model makes {in_dim}-d")
        if settings.vector_dim is not None and reduction.out_dim != settings.vector_dim:
            problems.append(f"it makes {reduction.out_dim}-d vectors, VECTOR_DIM={settings.vector_dim}")
        if method == "random" and reduction.seed != settings.vector_reduction_seed:
            problems.append(f"its seed is {reduction.seed}, VECTOR_REDUCTION_SEED="
                            f"{settings.vector_reduction_seed}")
        if problems:
            raise ConfigError(
                f"VECTOR_REDUCTION_FILE={settings.vector_reduction_file} does not fit: "
                + "; ".join(problems)
            )
        return reduction.to_metadata()
    assert settings.vector_dim is not None  # Settings validates this
    if method == "random":
        return random_projection(in_dim, settings.vector_dim, settings.vector_reduction_seed
                                 ).to_metadata()
    return {"identity": {"method": method, "in_dim": in_dim, "out_dim": settings.vector_dim}}
