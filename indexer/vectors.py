"""The only module that calls faiss: index specs, the factory, and vector files on disk.

An index is described as data, an :class:`IndexSpec` stored as JSON in the catalog, and turned
into a FAISS index by :func:`make_index`. Every index is wrapped in ``IDMap2`` so FAISS ids are
catalog primary keys and vectors can be removed or replaced by id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .errors import CrossmodalError

# kind -> function(spec, dim) returning the faiss factory string. Later kinds (ivf, ivfpq, hnsw,
# lsh, itq) add an entry here; everything else reads the spec.
_FACTORIES: dict[str, Callable[[IndexSpec, int], str]] = {
    "flat": lambda spec, dim: "IDMap2,Flat",
}


@dataclass(frozen=True)
class IndexSpec:
    """How vectors are indexed. ``params`` holds kind-specific settings (nlist, M, bits...)."""

    kind: str = "flat"
    metric: str = "ip"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _FACTORIES:
            raise CrossmodalError(f"unknown index type '{self.kind}'; available: {', '.join(sorted(_FACTORIES))}")
        if self.metric != "ip":
            raise CrossmodalError(f"unsupported metric '{self.metric}': embeddings are compared by inner product")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> IndexSpec:
        return cls(**json.loads(raw))

    def factory_string(self, dim: int) -> str:
        return _FACTORIES[self.kind](self, dim)


def make_index(spec: IndexSpec, dim: int) -> faiss.Index:
    return faiss.index_factory(dim, spec.factory_string(dim), faiss.METRIC_INNER_PRODUCT)


class VectorStore:
    """One FAISS index (one modality) with id-based add, remove and search."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> VectorStore:
        return cls(make_index(spec, dim))

    @classmethod
    def load(cls, path: Path) -> VectorStore:
        try:
            return cls(faiss.read_index(str(path)))
        except RuntimeError as exc:
            raise CrossmodalError(f"cannot read vector file {path}: {exc}") from exc

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products; rows padded with id -1 where fewer than k vectors exist."""
        k = max(1, min(k, max(1, len(self))))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def sync(self, expected_ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
        """Make the ids held equal ``expected_ids``: add missing ones (vectors from ``fetch``), drop extras.

        This is how a vector file catches up with the catalog after an interrupted run.
        """
        held = self.ids()
        missing = np.setdiff1d(expected_ids, held, assume_unique=True)
        extra = np.setdiff1d(held, expected_ids, assume_unique=True)
        self.remove(extra)
        if len(missing):
            self.add(missing, fetch(missing))
        return len(missing), len(extra)

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            faiss.write_index(self.index, str(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
