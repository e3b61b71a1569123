"""Index types as data: an :class:`IndexSpec` is a kind and its settings, stored as JSON in the catalog.

Its ``params`` hold build settings and search settings alike, so a tuned ``nprobe`` travels with
the index; what ``auto`` chose and what tuning measured are kept there too. The kinds:

- ``flat``: exact inner product.
- ``ivf``: IVF-Flat; ``nlist`` about 4*sqrt(n), a power of two; ``nprobe`` lists searched.
- ``ivfpq``: IVF with PQ codes of ``m`` bytes (OPQ-rotated when ``opq``); the top ``rerank``
  candidates are scored again exactly from full vectors.
- ``shards`` (ivf, ivfpq): the index is built ``shards`` parts at a time and its lists live in a file
  beside the vector file, memory-mapped for search (:mod:`indexer.ondisk`): for indexes bigger than RAM.
- ``hnsw``: an HNSW graph (``M``, ``ef_construction``, ``ef_search``). HNSW cannot delete, so removed
  vectors become tombstones filtered out at search, and the graph is rebuilt once they pass the
  ``tombstones`` share.
- ``lsh`` / ``itq``: ``bits``-bit binary codes (a random rotation of centred vectors, or ITQ: PCA
  plus a learned rotation) searched by Hamming distance, then re-ranked exactly.
- ``auto``: resolved to one of the above by :mod:`indexer.tuning` once the corpus size is known.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from .errors import CrossmodalError

KINDS = ("flat", "ivf", "ivfpq", "hnsw", "lsh", "itq", "auto")
LEARNED = frozenset({"ivf", "ivfpq", "lsh", "itq", "auto"})
BINARY = frozenset({"lsh", "itq"})
DEFAULT_PARAMS: dict[str, dict] = {  # target_recall: tune the search setting to it (indexer.tuning)
    "flat": {},
    "ivf": {"nprobe": 16, "target_recall": None, "shards": None},
    "ivfpq": {"nprobe": 16, "opq": True, "rerank": 100, "target_recall": None, "shards": None},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 64, "tombstones": 0.2, "target_recall": None},
    "lsh": {"bits": 256, "rerank": 200, "target_recall": None},
    "itq": {"bits": 256, "rerank": 200, "target_recall": None},
    "auto": {"target_recall": 0.95, "memory_budget": None},
}
LEARNED_SIZES = {"nlist", "m"}  # settings training derives when not given
RECORDS = {"auto", "tuned"}  # what auto chose and what tuning measured, kept with the spec
# Fewest vectors each kind can learn from: IVF wants ~39 per list, PQ 39 per each of its 256
# centroids, ITQ's PCA a few times the dimension.
MIN_TRAIN = {"ivf": 1_000, "ivfpq": 10_000, "lsh": 2, "itq": 1_000, "auto": 1}
TRAIN_SAMPLE = 200_000  # vectors used for training at most


class TooFewVectors(CrossmodalError):
    """The corpus is too small to train the requested kind."""

    @classmethod
    def for_kind(cls, kind: str, count: int, side: str | None = None) -> TooFewVectors:
        article = "an" if kind[0] in "aeiou" else "a"
        holds = f"the {side} side has" if side else "there are"
        return cls(f"{article} {kind} index learns from at least {MIN_TRAIN[kind]:,} vectors and {holds} {count:,}; "
                   "use --index-type flat (exact) or auto, which picks a kind the corpus can train")


@dataclass(frozen=True)
class IndexSpec:
    """How vectors are indexed; ``params`` are completed with the kind's defaults."""

    kind: str = "flat"
    metric: str = "ip"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CrossmodalError(f"unknown index type '{self.kind}'; available: {', '.join(KINDS)}")
        if self.metric != "ip":
            raise CrossmodalError(f"unsupported metric '{self.metric}': embeddings are compared by inner product")
        unknown = set(self.params) - set(DEFAULT_PARAMS[self.kind]) - LEARNED_SIZES - RECORDS
        if unknown:
            raise CrossmodalError(f"index type {self.kind} has no setting {', '.join(sorted(unknown))}")
        params = {**DEFAULT_PARAMS[self.kind], **self.params}
        bits = params.get("bits")
        if bits is not None and not (64 <= bits <= 1024 and bits % 8 == 0):
            raise CrossmodalError(f"--bits {bits}: binary codes take 64 to 1024 bits, a multiple of 8")
        for name in ("nprobe", "rerank", "M", "ef_construction", "ef_search", "nlist", "m", "shards"):
            if params.get(name) is not None and (not isinstance(params[name], int) or params[name] < 1):
                raise CrossmodalError(f"{name} must be a positive whole number, got {params[name]!r}")
        object.__setattr__(self, "params", params)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> IndexSpec:
        return cls(**json.loads(raw))

    def with_params(self, **params) -> IndexSpec:
        return replace(self, params={**self.params, **params})

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in RECORDS and v is not None}
        return self.kind + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + ")" if shown else "")


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: 4*sqrt(n) rounded to a power of two, and no more than n/39."""
    wanted = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    trainable = 2 ** max(0, int(math.log2(max(1, n // 39))))
    return max(1, min(wanted, trainable))


def pq_bytes_for(dim: int, most: int = 64) -> int:
    """Bytes of a PQ code: the largest divisor of ``dim`` up to ``most`` (one byte per sub-vector)."""
    return max(m for m in range(1, min(dim, most) + 1) if dim % m == 0)
