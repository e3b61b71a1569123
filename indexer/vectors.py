"""The only modules that call faiss: a :class:`VectorStore` per modality, of any kind in :mod:`indexer.spec`
(each kind's faiss index behind the interface of :mod:`indexer.backends`).

Ids are catalog primary keys. Kinds that learn from data (``ivf``, ``ivfpq``, ``lsh``, ``itq``, and
``auto`` until it is resolved) hold added vectors aside until :meth:`VectorStore.train`; meanwhile
search is exact over them. Full vectors for re-ranking come from :attr:`VectorStore.exact` (the
catalog, in an index).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from . import backends, ondisk
from .backends import Allowed, Backend, Binary, as_floats, as_ids, gpu_count
from .errors import CrossmodalError, VectorFileError
from .spec import (
    BINARY,
    LEARNED,
    MIN_TRAIN,
    TRAIN_SAMPLE,
    IndexSpec,
    TooFewVectors,
    nlist_for,
    pq_bytes_for,
)

OPQ_ITERATIONS = 20
# A filter admitting at most this share of the vectors is searched exactly over just those: the
# index would visit mostly vectors it must then skip.
EXACT_SHARE = 0.02
SYNC_CHUNK = 50_000  # vectors fetched from the catalog at a time when a file catches up
TOP_K_CELLS = 4_000_000  # (query, vector) scores of the exact top-k at a time: ~80 MB of working memory


class VectorStore:
    """One modality's vectors in one kind of index, with id-based add, remove, search and save."""

    def __init__(self, spec: IndexSpec, dim: int, backend: Backend | None = None):
        self.spec, self.dim = spec, dim
        self.backend = backend  # None until trained for learned kinds
        if backend is None and spec.kind not in LEARNED:
            self.backend = backends.empty(spec, dim)
        self.exact: Callable[[np.ndarray], np.ndarray] | None = None  # full vectors by id, for re-ranking
        self.use_gpu = False  # flat and IVF search, IVF training on the GPU (see gpu_wanted)
        self._pending_ids = np.zeros(0, dtype=np.int64)
        self._pending = np.zeros((0, dim), dtype=np.float32)

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> VectorStore:
        return cls(spec, dim)

    @classmethod
    def load(cls, path: Path, spec: IndexSpec, dim: int) -> VectorStore:
        """Read a vector file written by :meth:`save` for ``spec``; a file of another kind is an error.

        Raises :class:`VectorFileError` for a file that is there but is not a whole vector file.
        """
        try:
            with open(path, "rb"):  # a file we may not read is not a damaged one: say what the OS says
                pass
        except OSError as exc:
            raise CrossmodalError(f"cannot read vector file {path}: {exc.strerror or exc}") from exc
        try:
            backend = backends.read(path, spec, dim)
        except backends.WrongKind as exc:
            raise StaleVectorFile(f"{path} holds a {exc.found} index, the catalog says {spec.describe()}") from None
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
            # faiss's text ends in an errno that has nothing to do with the file, e.g. "(Success)"
            raise _damaged(path) from exc
        return cls(spec, dim, backend)

    # -- what it holds --------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return self.backend is not None

    def __len__(self) -> int:
        return len(self._pending_ids) if self.backend is None else len(self.backend)

    def ids(self) -> np.ndarray:
        return self._pending_ids.copy() if self.backend is None else self.backend.ids()

    def nlist(self) -> int:
        return self.backend.nlist()

    @property
    def on_disk(self) -> bool:
        """Lists mapped from a file (``shards``): a reader leaves them as saved instead of catching up."""
        return self.backend is not None and self.backend.on_disk

    def code_bytes(self) -> int:
        """Bytes each vector takes in the index structure (codes, not ids or graph links)."""
        if self.backend is None:
            return self.spec.params["bits"] // 8 if self.spec.kind in BINARY else self.dim * 4
        return self.backend.code_bytes()

    def held_aside(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) added before training."""
        return self._pending_ids, self._pending

    # -- training -------------------------------------------------------------------------------
    def train(self, sample: np.ndarray, n: int | None = None) -> None:
        """Learn the index from ``sample`` (for ``n`` vectors in all), then index what was held aside."""
        if self.spec.kind == "auto":
            raise CrossmodalError("internal: resolve an auto spec (indexer.tuning) before training")
        if self.backend is not None:  # trained already (or a kind that does not learn): adding needs no training
            return
        sample = as_floats(sample)
        n = n or len(sample)
        need = MIN_TRAIN[self.spec.kind]
        if len(sample) < need:
            raise TooFewVectors.for_kind(self.spec.kind, len(sample))
        self.spec, self.backend = _trained(self.spec, self.dim, sample, n, self.use_gpu)
        ids, vectors = self._pending_ids, self._pending
        self._pending_ids, self._pending = np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), np.float32)
        self.add(ids, vectors)

    def build_sharded(self, sample: np.ndarray, n: int,
                      shards: Iterable[Iterable[tuple[np.ndarray, np.ndarray]]] | ondisk.ShardWriter,
                      home: Path) -> None:
        """Train on ``sample`` (for ``n`` vectors), then add ``shards`` (each an iterable of (ids, vectors)
        chunks) one shard at a time, merged into a list file beside ``home``: memory for one shard's codes.
        ``shards`` may be a function writing the shard files elsewhere (:func:`indexer.ondisk.build`)."""
        if self.backend is not None or len(self._pending_ids):
            raise CrossmodalError("internal: a sharded build starts from an empty, untrained store")
        self.train(sample, n)
        index = ondisk.build(self.backend.index, shards, home)
        self.backend = backends.BY_KIND[self.spec.kind](self.spec, self.dim, index, Path(home))

    # -- changes --------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids (replace = :meth:`remove` then add)."""
        ids, vectors = as_ids(ids), as_floats(vectors)
        if not len(ids):
            return
        if self.backend is None:
            self._pending_ids = np.concatenate([self._pending_ids, ids])
            self._pending = np.concatenate([self._pending, vectors])
        else:
            self.backend.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        ids = as_ids(ids)
        if not len(ids):
            return 0
        if self.backend is not None:
            return self.backend.remove(ids)
        keep = ~np.isin(self._pending_ids, ids)
        self._pending_ids, self._pending = self._pending_ids[keep], self._pending[keep]
        return int((~keep).sum())

    def sync(self, expected_ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
        """Make the ids held equal ``expected_ids``: add missing ones (vectors from ``fetch``), drop extras.

        This is how a vector file catches up with the catalog after an interrupted run.
        """
        expected_ids = as_ids(expected_ids)
        if isinstance(self.backend, backends.HNSW) and len(self.backend.dead):
            self.backend.keep_last_copies()
        held, copies = np.unique(self.ids(), return_counts=True)
        doubled = held[copies > 1]
        if len(doubled):  # every copy goes; the catalog's vector comes back below
            self.remove(doubled)
            held = np.setdiff1d(held, doubled, assume_unique=True)
        missing = np.setdiff1d(expected_ids, held, assume_unique=True)
        extra = np.setdiff1d(held, expected_ids, assume_unique=True)
        self.remove(extra)
        for start in range(0, len(missing), SYNC_CHUNK):  # after a crash, maybe a whole run's: in batches
            self.add(missing[start:start + SYNC_CHUNK], fetch(missing[start:start + SYNC_CHUNK]))
        return len(missing), len(extra)

    # -- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | Allowed | None = None,
               **settings) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products, among the ids in ``allowed`` when it is given (an array of ids, or an
        :class:`Allowed` made once for many queries); rows padded with id -1 where fewer than k
        vectors (allowed ones) exist.

        A filter is applied inside the index (faiss's id selectors), so k results come back when k
        allowed vectors exist; a filter admitting at most ``EXACT_SHARE`` of the vectors is searched
        exactly over those vectors. ``settings`` override the spec's search parameters for this call
        (nprobe, ef_search, rerank).
        """
        queries = as_floats(np.atleast_2d(queries))
        params = {**self.spec.params, **settings}
        admitted = allowed if allowed is None or isinstance(allowed, Allowed) else Allowed(allowed)
        k = max(1, min(k, len(self) if admitted is None else max(1, len(admitted))))
        if self.backend is None:
            base, base_ids = self._pending, self._pending_ids
            if admitted is not None:
                keep = np.isin(base_ids, admitted.ids)
                base, base_ids = base[keep], base_ids[keep]
            return exact_top_k(queries, base, base_ids, k)
        if admitted is not None and len(admitted) <= EXACT_SHARE * len(self):
            full = self.backend.stored(admitted.ids) if len(admitted) else np.zeros((0, self.dim), np.float32)
            if full is None and self.exact is not None:
                full = self.exact(admitted.ids)
            if full is not None:
                return _finite(exact_top_k(queries, full, admitted.ids, k))
        if not self.backend.reranks:
            return self.backend.search(queries, k, params, admitted, self.use_gpu)
        scores, found = self.backend.search(queries, max(k, params["rerank"]), params, admitted, self.use_gpu)
        return self._rerank(queries, scores, found, k)

    def _rerank(self, queries, scores, found, k) -> tuple[np.ndarray, np.ndarray]:
        if self.exact is None:  # no full vectors at hand: approximate scores, best first
            return scores[:, :k], found[:, :k]
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        wanted = np.unique(found[found >= 0])
        full = self.exact(wanted) if len(wanted) else np.zeros((0, self.dim), np.float32)
        for start in range(0, len(queries), 64):  # bounds the (queries, candidates, dim) gather
            rows = found[start:start + 64]
            where = np.searchsorted(wanted, np.maximum(rows, 0))
            exact = np.einsum("qcd,qd->qc", full[where] if len(wanted) else np.zeros(rows.shape + (self.dim,)),
                              queries[start:start + 64])
            exact[(rows < 0) | ~np.isfinite(exact)] = -np.inf  # padding, or deleted since the file was written
            best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            out_scores[start:start + 64, :best.shape[1]] = np.take_along_axis(exact, best, 1)
            out_ids[start:start + 64, :best.shape[1]] = np.take_along_axis(rows, best, 1)
        out_ids[~np.isfinite(out_scores)] = -1
        return out_scores, out_ids

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one.

        A store still waiting for training writes nothing and removes an older file: its vectors
        are all in the catalog, and the next run trains on them.
        """
        path = Path(path)
        if self.backend is None:
            path.unlink(missing_ok=True)
            ondisk.remove_unused(path, keep=None)
            return
        if self.spec.params.get("shards") and not self.backend.on_disk:  # built in memory (an index run)
            self.backend.move_to_disk(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            self.backend.write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync(path.parent)
        self.backend.saved(path)


class StaleVectorFile(CrossmodalError):
    """A vector file of another kind than the catalog's spec (a reindex was interrupted)."""


def _finite(result: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = result  # a vector the catalog no longer has (deleted meanwhile) scores NaN
    bad = ~np.isfinite(scores)
    scores[bad], ids[bad] = -np.inf, -1
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _damaged(path: Path) -> VectorFileError:
    try:
        size = Path(path).stat().st_size
    except OSError:  # replaced meanwhile by a writer: what was read is still not a vector file
        size = -1
    what = "it is empty" if size == 0 else "faiss cannot read it: truncated or overwritten"
    return VectorFileError(f"the vector file {path} is damaged ({what}); `crossmodal verify --repair` rebuilds it "
                           "from the vectors in the catalog")


def similar_pairs(vectors: np.ndarray, threshold: float, k: int = 16, block: int = 2048,
                  on_block: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)``, ``i < j``, of rows of ``vectors`` (unit rows) whose cosine is at least
    ``threshold``, among each row's ``k`` nearest others; exact (a flat inner-product index).

    Queries go ``block`` rows at a time, so memory stays at the vectors plus ``block * (k + 1)``
    results; ``on_block(done, total)`` after each block.
    """
    n, dim = vectors.shape
    if n < 2:
        return
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    want = min(k + 1, n)
    for start in range(0, n, block):
        scores, ids = index.search(np.ascontiguousarray(vectors[start:start + block], dtype=np.float32), want)
        for offset, (row_scores, row_ids) in enumerate(zip(scores, ids)):
            i = start + offset
            for score, j in zip(row_scores, row_ids):
                if score < threshold:
                    break  # best first: the rest are further
                if j >= 0 and j != i:
                    yield (i, int(j), float(score)) if i < j else (int(j), i, float(score))
        if on_block is not None:
            on_block(min(start + block, n), n)


def serial_in_this_thread() -> None:
    """Make the FAISS work of the calling thread run on that thread alone (OpenMP's per-thread setting).

    For a server's query threads: each answers one query at a time, and FAISS spreads a single
    query over threads hardly at all; but every thread that opens an OpenMP team keeps it, and
    libgomp (which torch loads and FAISS then shares) stops spinning between parallel regions once
    its teams hold more threads than there are cores. Measured in a plain process on 2 cores, with
    a second team alive a demo-model text encode took 11 ms instead of 3.3 ms.
    """
    faiss.omp_set_num_threads(1)


def gpu_wanted(device: str) -> bool:
    """Whether a --device asks faiss for the GPU (auto: when there is one); no GPU means CPU, quietly."""
    return device != "cpu" and gpu_count() > 0


def _trained(spec: IndexSpec, dim: int, sample: np.ndarray, n: int, use_gpu: bool = False):
    """(spec with learned sizes, trained empty backend) for a learned kind."""
    rng = np.random.default_rng(0)
    if len(sample) > TRAIN_SAMPLE:
        sample = sample[np.sort(rng.choice(len(sample), TRAIN_SAMPLE, replace=False))]
    kind, params = spec.kind, spec.params
    if kind in BINARY:
        bits = params["bits"]
        if kind == "itq":
            if bits > dim:
                fewer = f"--bits {dim - dim % 8} or fewer, or " if dim >= 64 else ""
                raise CrossmodalError(f"itq learns at most {dim} bits from {dim}-d vectors; "
                                      f"use {fewer}--index-type lsh")
            codec = faiss.ITQTransform(dim, bits, True)
            codec.train(sample)
        else:
            rotation = faiss.RandomRotationMatrix(dim, bits)
            rotation.init(1234)
            a = faiss.vector_to_array(rotation.A).reshape(bits, dim)
            codec = faiss.LinearTransform(dim, bits, True)
            faiss.copy_array_to_vector(a.ravel(), codec.A)
            faiss.copy_array_to_vector(-(a @ sample.mean(axis=0)).astype(np.float32), codec.b)  # centre first
            codec.is_trained = True
        return spec, Binary(spec, dim, faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits)), codec)
    nlist = params.get("nlist") or nlist_for(max(n, len(sample)))
    nlist = min(nlist, len(sample))
    if kind == "ivf":
        factory = f"IVF{nlist},Flat"  # nlist stays out of the spec: image and text sides differ
    else:
        m = params.get("m") or pq_bytes_for(dim)
        if dim % m:
            raise CrossmodalError(f"PQ codes of {m} bytes need a dimension divisible by {m}; the vectors have {dim}")
        spec = spec.with_params(m=m)
        factory = (f"OPQ{m},IVF{nlist},PQ{m}" if params["opq"] else f"IVF{nlist},PQ{m}")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexPreTransform):
        # faiss's 50 OPQ iterations each train a whole PQ; 20 reach nearly the same rotation.
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True  # unit vectors: centroids on the sphere, as inner product expects
    ivf.cp.seed = 1234
    if use_gpu and gpu_count():  # k-means assignment, the bulk of IVF training, on the GPU
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(sample)
    ivf.clustering_index = None
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by catalog id
    return spec, backends.BY_KIND[kind](spec, dim, index)


def exact_top_k(queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int,
                exclude: np.ndarray | None = None, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-k inner products, blockwise, padded with -inf and id -1 past the
    base's size; ``exclude[i]`` is never query i's answer. Brute force, in numpy: the ground truth."""
    blocks = ((base_ids[start:start + block], base[start:start + block]) for start in range(0, len(base), block))
    return streamed_top_k(queries, blocks, k, exclude)


def streamed_top_k(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_top_k` over a base that comes as (ids, vectors) batches: memory for one batch and the
    running top k, so the base may be bigger than RAM (read from the catalog batch by batch)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    # Score a slice of the batch at a time: the (queries, slice) scores, their int64 ids and argpartition's
    # indices take ~20 bytes a cell, so 1,000 queries against a 65,536 batch would need 1.3 GB at once.
    step = max(k + 1, TOP_K_CELLS // max(1, len(queries)))
    slices = ((ids[i:i + step], vectors[i:i + step]) for ids, vectors in batches for i in range(0, len(ids), step))
    for batch_ids, batch in slices:
        if not len(batch_ids):
            continue
        scores = queries @ np.asarray(batch, dtype=np.float32).T
        ids = np.broadcast_to(np.asarray(batch_ids, dtype=np.int64), scores.shape)
        if exclude is not None:
            scores = np.where(ids == exclude[:, None], -np.inf, scores)
        scores, ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        if scores.shape[1] > k:  # partition first: sorting whole blocks dominates at a million vectors
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    top_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    top_ids = np.full((len(queries), k), -1, dtype=np.int64)
    top_scores[:, :best_scores.shape[1]], top_ids[:, :best_ids.shape[1]] = best_scores, best_ids
    return top_scores, top_ids


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

