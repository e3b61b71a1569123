"""Choosing an index type for a corpus, and tuning its search setting to a target recall.

``auto`` picks by size and memory: exact ``flat`` under :data:`FLAT_BELOW` vectors, HNSW or
IVF-Flat while full vectors fit the budget, IVF-PQ beyond. Then :func:`tune` raises the kind's
search setting (``nprobe``, ``ef_search`` or ``rerank``) from small to large and keeps the first
value whose recall@10 against exact search reaches the target. The queries it measures with
are cross-modal where possible (captions against the image index), because that is what users
ask and its distribution differs from the indexed vectors'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CrossmodalError
from .spec import DEFAULT_PARAMS, IndexSpec, pq_bytes_for
from .vectors import VectorStore

FLAT_BELOW = 100_000
HNSW_UP_TO = 5_000_000  # past this, building the graph takes too long; IVF trains and adds faster
SEARCH_SETTING = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search", "lsh": "rerank", "itq": "rerank"}
TUNING_QUERIES = 1_000
TUNING_K = 10


def memory_bytes(kind: str, n: int, dim: int, m: int | None = None) -> int:
    """Approximate resident bytes of ``n`` vectors in an index of ``kind`` (ids included)."""
    per_vector = {
        "flat": dim * 4 + 8,
        "ivf": dim * 4 + 8,
        "hnsw": dim * 4 + 8 + int(DEFAULT_PARAMS["hnsw"]["M"] * 2 * 4 * 1.1),  # level-0 links dominate
        "ivfpq": (m or pq_bytes_for(dim)) + 8,
    }[kind]
    return n * per_vector


def choose(n: int, dim: int, memory_budget: int | None = None, target_recall: float = 0.95) -> IndexSpec:
    """The index type ``auto`` stands for with ``n`` vectors of ``dim`` under ``memory_budget`` bytes."""
    def fits(kind: str, m: int | None = None) -> bool:
        return memory_budget is None or memory_bytes(kind, n, dim, m) <= memory_budget

    auto = {"auto": {"target_recall": target_recall, "memory_budget": memory_budget, "chosen_for": n}}
    tuned = {**auto, "target_recall": target_recall}
    if n < FLAT_BELOW and fits("flat"):
        return IndexSpec("flat", params=auto)
    if fits("hnsw") and n <= HNSW_UP_TO:
        return IndexSpec("hnsw", params=tuned)
    if fits("ivf"):
        return IndexSpec("ivf", params=tuned)
    for m in sorted({pq_bytes_for(dim, most) for most in (64, 32, 16, 8)}, reverse=True):
        if fits("ivfpq", m):
            return IndexSpec("ivfpq", params={**tuned, "m": m})
    raise CrossmodalError(f"{n:,} vectors do not fit in --memory-budget {memory_budget:,} bytes even as 8-byte "
                          f"PQ codes ({memory_bytes('ivfpq', n, dim, pq_bytes_for(dim, 8)):,} bytes); raise it")


@dataclass(frozen=True)
class Tuning:
    setting: str
    value: int
    recall: float  # recall@10 against exact search at ``value``
    queries: int
    reached: bool


def candidates(store: VectorStore) -> list[int]:
    kind = store.spec.kind
    if kind in ("ivf", "ivfpq"):
        nlist = store.nlist()
        return [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if v < nlist] + [nlist]
    if kind == "hnsw":
        return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    return [20, 50, 100, 200, 500, 1000, 2000, 5000]


def tune(store: VectorStore, queries: np.ndarray, truth: np.ndarray, target: float,
         exclude: np.ndarray | None = None) -> Tuning:
    """Smallest search setting whose recall@k (against ``truth``, exact top-k ids) reaches ``target``."""
    setting = SEARCH_SETTING[store.spec.kind]
    k = truth.shape[1]
    recall = 0.0
    values = candidates(store)
    for value in values:
        _, found = store.search(queries, k + (exclude is not None), **{setting: value})
        if exclude is not None:
            found = np.array([[i for i in row if i != own][:k] for row, own in zip(found, exclude)])
        recall = float(np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth)]))
        if recall >= target:
            return Tuning(setting, value, round(recall, 4), len(queries), True)
    return Tuning(setting, values[-1], round(recall, 4), len(queries), False)


def tuning_picks(available: int, seed: int = 0) -> np.ndarray:
    """Positions of the tuning queries among ``available`` vectors, in order.

    They are the other modality's vectors where it has enough, else the index's own ones, each then
    excluded from its own answers (it is in the index).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(available, min(TUNING_QUERIES, available), replace=False)
    return np.sort(pick)
