"""One class per index kind behind one small interface: ``add``, ``remove``, ``search(queries, k,
params, allowed)``, ``ids``, ``write``; with :mod:`indexer.vectors` the only modules that call faiss.

``allowed`` is an :class:`Allowed` (a set of catalog ids, as faiss's bitmap selector) or None: a
kind searches only those ids inside faiss, so a filtered query still fills its k results when k
allowed vectors exist. Kinds with ``reranks`` return approximate scores for the caller to re-rank.
"""

from __future__ import annotations

import io
from pathlib import Path

import faiss
import numpy as np

from . import ondisk
from .errors import CrossmodalError
from .ondisk_changes import Changes, rewrite
from .spec import BINARY, IndexSpec

# From this share of the corpus admitted, a flat index over-fetches unfiltered instead (Flat._overfetched).
OVERFETCH_SHARE = 0.2
# Additions to an on-disk index held in memory past this size are merged into a new list file there and then.
FOLD_BYTES = 512 * 2**20
MAX_FILTERED_EF = 4096  # an HNSW beam wider than this costs more than the exact search it would replace
# Below this many queries faiss's flat search scans with its own kernel, one thread per query (its
# distance_compute_blas_threshold); a BLAS matrix product uses every core instead (Flat._few_queries).
FEW_QUERIES = 20


def as_floats(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def as_ids(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


class Allowed:
    """The ids a filtered search may return, as a bitmap over ids (catalog ids are small and dense).

    Holds the bitmap and the selector together: faiss keeps a raw pointer to the bitmap. Built once
    per filter and reused by every query with it (a million ids take a few milliseconds).
    """

    def __init__(self, ids: np.ndarray):
        ids = as_ids(ids)
        ids = ids[ids >= 0]
        bits = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=bool)
        bits[ids] = True  # np.unique would cost 100 times more
        self._bits, self._ids = bits, None
        self._count = int(np.count_nonzero(bits))
        self._bitmap = np.packbits(bits, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))  # n: bytes

    @property
    def ids(self) -> np.ndarray:
        """The admitted ids, sorted."""
        if self._ids is None:
            self._ids = np.flatnonzero(self._bits).astype(np.int64)
        return self._ids

    def __len__(self) -> int:
        return self._count

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` (any shape; -1 for none) is admitted."""
        inside = (ids >= 0) & (ids < len(self._bits))
        return inside & self._bits[np.where(inside, ids, 0)]


def _widened(value: int, allowed: Allowed | None, held: int) -> int:
    """A search effort (lists, beam) divided by the share a filter admits, for IVF and HNSW alike."""
    if allowed is None or not held:
        return value
    return int(np.ceil(value / min(1.0, max(len(allowed) / held, 1e-6))))


def _params(cls=faiss.SearchParameters, allowed: Allowed | None = None, **values):
    params = cls()
    for name, value in values.items():
        setattr(params, name, value)
    if allowed is not None:
        params.sel = allowed.selector
    return params


class Backend:
    """A trained faiss index of one kind, holding vectors under catalog ids."""

    reranks = False  # scores are approximate: the caller re-ranks a deeper candidate list exactly
    kind = ""
    on_disk = False  # lists in a mapped file beside the vector file (indexer.ondisk)

    def __init__(self, spec: IndexSpec, dim: int, index):
        self.spec, self.dim, self.index = spec, dim, index
        self._gpu = None  # a GPU copy for searching, dropped at every change

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._gpu = None
        self.index.add_with_ids(as_floats(vectors), as_ids(ids))

    def remove(self, ids: np.ndarray) -> int:
        self._gpu = None
        return int(self.index.remove_ids(as_ids(ids)))

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def code_bytes(self) -> int:
        """Bytes each vector takes in the index structure (codes, not ids or graph links)."""
        return self.dim * 4

    def stored(self, ids: np.ndarray) -> np.ndarray | None:
        """The full vectors of ``ids`` from the index itself (faster than the catalog), or None when this
        kind keeps only codes or does not hold one of them."""
        try:
            return self.index.reconstruct_batch(as_ids(ids))
        except RuntimeError:  # an id not held (the file lags the catalog): the caller asks the catalog
            return None

    def search(self, queries: np.ndarray, k: int, params: dict, allowed: Allowed | None = None,
               use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def write(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    def saved(self, path: Path) -> None:
        """Called once ``path`` is this index's vector file: list files of an earlier on-disk index go."""
        ondisk.remove_unused(path, keep=None)

    def _on_gpu(self, use_gpu: bool):
        """A GPU copy when asked for and faiss has a GPU; None (search on the CPU) otherwise, and for lists
        on disk (a copy would read them all: they are on disk because they are big)."""
        if not use_gpu or self.on_disk or not gpu_count():
            return None
        if self._gpu is None:
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError:  # a structure the GPU build cannot clone: stay on the CPU
                self._gpu = False
        return self._gpu or None


class Flat(Backend):
    kind = "flat"

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> Flat:
        return cls(spec, dim, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    def search(self, queries, k, params, allowed=None, use_gpu=False):
        gpu = None if allowed is not None else self._on_gpu(use_gpu)  # selectors are a CPU feature
        if gpu is not None:
            return gpu.search(queries, k)
        if allowed is None:
            return self._few_queries(queries, k) if len(queries) < FEW_QUERIES else self.index.search(queries, k)
        share = len(allowed) / max(1, len(self))
        if share < OVERFETCH_SHARE:
            return self.index.search(queries, k, params=_params(allowed=allowed))
        return self._overfetched(queries, k, allowed, share)

    def _few_queries(self, queries, k):
        """faiss's exact answer for a handful of queries, scored by one BLAS product over the stored rows.

        faiss scans these with one thread per query; the product runs on every core and reads the
        vectors once at close to memory speed (bench/query_latency.py: 1M x 512 on 2 cores). Equal
        scores rank by row, earlier first; padding is faiss's (-FLT_MAX, id -1).
        """
        n = len(self)
        out_scores = np.full((len(queries), k), np.finfo(np.float32).min, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        if n == 0 or k == 0:
            return out_scores, out_ids
        # Views of faiss's own arrays, no copies: the stored rows and the catalog id of each
        base = faiss.downcast_index(self.index.index)
        rows = faiss.rev_swig_ptr(base.get_xb(), n * self.dim).reshape(n, self.dim)
        row_ids = faiss.rev_swig_ptr(self.index.id_map.data(), n)
        scores = as_floats(queries) @ rows.T
        depth = min(k, n)
        for q, row in enumerate(scores):
            kth = np.partition(row, n - depth)[n - depth]
            above = np.flatnonzero(row > kth)
            tied = np.flatnonzero(row == kth)[: depth - len(above)]
            chosen = np.concatenate([above, tied])
            chosen = chosen[np.lexsort((chosen, -row[chosen]))]
            out_scores[q, :depth], out_ids[q, :depth] = row[chosen], row_ids[chosen]
        return out_scores, out_ids

    def _overfetched(self, queries, k, allowed, share):
        """A filter admitting much of the corpus: faiss's blocked matrix product over everything, deep
        enough that k admitted vectors are almost surely among the results, is faster than its
        vector-at-a-time filtered scan; rows that still lack k are searched with the filter. Exact
        either way: the best k admitted of an exact ranking are the exact filtered top k."""
        depth = min(len(self), int(np.ceil(4 * k / share)) + k)
        scores, found = self.index.search(queries, depth)
        admitted = allowed.contains(found)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        short = []
        for row in range(len(queries)):
            keep = np.flatnonzero(admitted[row])[:k]
            if len(keep) < k and depth < len(self):
                short.append(row)
            out_scores[row, :len(keep)], out_ids[row, :len(keep)] = scores[row, keep], found[row, keep]
        if short:
            out_scores[short], out_ids[short] = self.index.search(queries[short], k, params=_params(allowed=allowed))
        return out_scores, out_ids


class IVF(Backend):
    """IVF-Flat; ids live in the inverted lists (a hashtable direct map lets ids be removed).

    Its lists may be in a mapped list file (``--shards``), which is never changed: changes wait in
    ``changes`` and are merged into a new list file beside ``home`` (the vector file) before a search or
    a write (see :mod:`indexer.ondisk`).
    """

    kind = "ivf"

    def __init__(self, spec: IndexSpec, dim: int, index, home: Path | None = None):
        super().__init__(spec, dim, index)
        self.home = home
        self.saved_lists: Path | None = None  # the list file a saved vector file names (readers may map it)
        self.changes = Changes(index) if ondisk.is_on_disk(index) else None

    @property
    def on_disk(self) -> bool:
        return self.changes is not None

    def __len__(self) -> int:
        return len(self.changes) if self.on_disk else super().__len__()

    def add(self, ids, vectors) -> None:
        if not self.on_disk:
            return super().add(ids, vectors)
        self._gpu = None
        self.changes.add(as_ids(ids), as_floats(vectors))
        if self.changes.pending_bytes() > FOLD_BYTES:  # a long run's additions: into a list file, not RAM
            self._apply_changes()

    def remove(self, ids) -> int:
        if not self.on_disk:
            return super().remove(ids)
        self._gpu = None
        return self.changes.remove(as_ids(ids))

    def move_to_disk(self, home: Path) -> None:
        """Lists built in memory into a list file beside ``home`` (a spec with ``shards`` serves them mapped)."""
        self._replace(rewrite(self.index, home), home)

    def write(self, path: Path) -> None:
        if not self.on_disk:
            return super().write(path)
        self._apply_changes()
        ondisk.write(self.index, path)

    def saved(self, path: Path) -> None:
        if not self.on_disk:
            return super().saved(path)
        self.home, self.saved_lists = Path(path), ondisk.data_file(self.index)
        ondisk.remove_unused(path, keep=self.saved_lists)

    def _apply_changes(self) -> None:
        """Merge waiting changes into a new list file: before a write, and before a writer's own search."""
        if not (self.on_disk and self.changes.changed):
            return
        try:
            self._replace(self.changes.applied(self.home), self.home)
        except (RuntimeError, OSError) as exc:  # a full disk, mostly: the file named so far stays as it was
            raise CrossmodalError(f"cannot write a new list file beside {self.home}: {exc}; "
                                  "the saved index is unchanged") from exc

    def _replace(self, index, home: Path) -> None:
        unsaved = ondisk.data_file(self.index) if self.on_disk else None
        self.index, self.home, self._gpu = index, Path(home), None
        self.changes = Changes(index)
        if unsaved is not None and unsaved != self.saved_lists:  # an earlier fold of this run: no file names it
            unsaved.unlink(missing_ok=True)

    def ivf(self):
        return faiss.extract_index_ivf(self.index)

    def ids(self) -> np.ndarray:
        return self.changes.ids() if self.on_disk else ondisk.list_ids(self.ivf().invlists)

    def nlist(self) -> int:
        return int(self.ivf().nlist)

    def nprobe(self, params: dict, allowed: Allowed | None) -> int:
        """Lists to probe: under a filter admitting a share f of the vectors, nprobe/f lists, so that as
        many admitted vectors are scanned as an unfiltered search scans (its k best lie about k/f
        ranks deep in the unfiltered ranking). Below the exact share, the lists are all of them."""
        return max(1, min(_widened(params["nprobe"], allowed, len(self)), self.nlist()))

    def search(self, queries, k, params, allowed=None, use_gpu=False):
        self._apply_changes()
        nprobe = self.nprobe(params, allowed)
        gpu = None if allowed is not None else self._on_gpu(use_gpu)
        if gpu is not None:
            faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", min(nprobe, 2048))
            return gpu.search(queries, k)
        return self.index.search(queries, k, params=_params(faiss.SearchParametersIVF, allowed, nprobe=nprobe))


class IVFPQ(IVF):
    kind = "ivfpq"
    reranks = True

    def stored(self, ids):
        return None  # PQ codes: approximate vectors only

    def code_bytes(self) -> int:
        return int(self.ivf().code_size)

    def search(self, queries, k, params, allowed=None, use_gpu=False):
        self._apply_changes()
        # an OPQ index is an IndexPreTransform, which hands IVF parameters through to the IVF index
        return self.index.search(queries, k, params=_params(faiss.SearchParametersIVF, allowed,
                                                            nprobe=self.nprobe(params, allowed)))


class HNSW(Backend):
    """HNSW cannot delete: removed vectors become tombstones (positions) filtered out at search, and
    the graph is rebuilt from its live vectors once they pass the spec's ``tombstones`` share."""

    kind = "hnsw"

    def __init__(self, spec: IndexSpec, dim: int, index, dead: np.ndarray | None = None):
        super().__init__(spec, dim, index)
        self.dead = np.zeros(index.ntotal, dtype=bool) if dead is None else dead
        self._alive = None  # (the tombstone filter, what it points into), built at the first search

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> HNSW:
        graph = faiss.IndexHNSWFlat(dim, spec.params["M"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = spec.params["ef_construction"]
        return cls(spec, dim, faiss.IndexIDMap2(graph))

    def __len__(self) -> int:
        return int(self.index.ntotal - self.dead.sum())

    def ids(self) -> np.ndarray:
        return self._id_map()[~self.dead]

    def _id_map(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids, vectors) -> None:
        self._alive = None
        self.index.add_with_ids(as_floats(vectors), as_ids(ids))
        self.dead = np.concatenate([self.dead, np.zeros(len(ids), dtype=bool)])

    def remove(self, ids) -> int:
        self._alive = None
        hit = np.isin(self._id_map(), as_ids(ids)) & ~self.dead
        self.dead |= hit
        if self.dead.sum() > self.spec.params["tombstones"] * len(self.dead):
            self._compact()
        return int(hit.sum())

    def keep_last_copies(self) -> None:
        """An id written twice (removed, then added again) lives at its last position only."""
        id_map = self._id_map()
        last = np.zeros(len(id_map), dtype=bool)
        last[len(id_map) - 1 - np.unique(id_map[::-1], return_index=True)[1]] = True
        self.dead |= ~last
        self._alive = None

    def _compact(self) -> None:
        inner = faiss.downcast_index(self.index.index)
        live = np.flatnonzero(~self.dead)
        vectors, ids = inner.storage.reconstruct_n(0, inner.ntotal)[live], self._id_map()[live]
        fresh = HNSW.empty(self.spec, self.dim)
        self.index, self.dead = fresh.index, fresh.dead
        self.add(ids, vectors)

    def search(self, queries, k, params, allowed=None, use_gpu=False):
        if self._alive is None:
            alive = None
            if self.dead.any():
                dead = Allowed(np.flatnonzero(self.dead))  # positions, not ids: the graph's own numbering
                alive = (faiss.IDSelectorNot(dead.selector), dead)
            self._alive = (self._id_map(), alive)
        id_map, alive = self._alive
        parts: list = []  # every selector in a chain, kept alive while faiss points at them
        selector = alive[0] if alive is not None else None
        if allowed is not None:  # the graph works in positions; the filter is in ids
            parts = [faiss.IDSelectorTranslated(self.index.id_map, allowed.selector), allowed]
            selector = parts[0] if selector is None else faiss.IDSelectorAnd(selector, parts[0])
        settings = faiss.SearchParametersHNSW()
        settings.efSearch = max(self.ef_search(params, allowed), k)
        if selector is not None:
            settings.sel = selector
        scores, positions = faiss.downcast_index(self.index.index).search(queries, k, params=settings)
        del parts
        return scores, np.where(positions >= 0, id_map[np.maximum(positions, 0)], -1)

    def ef_search(self, params: dict, allowed: Allowed | None) -> int:
        """Under a filter admitting a share f, the beam widens to ef/f, so that about as many admitted
        nodes are among its candidates as without a filter (measured at 200k vectors, 5 % admitted:
        recall@10 0.90 at ef/sqrt(f), 0.96 at ef/f^0.75, 0.99 at ef/f)."""
        return min(_widened(params["ef_search"], allowed, len(self)), MAX_FILTERED_EF)


class Binary(Backend):
    """``bits``-bit codes from a float transform (``codec``), searched by Hamming distance."""

    reranks = True

    def __init__(self, spec: IndexSpec, dim: int, index, codec):
        super().__init__(spec, dim, index)
        self.codec = codec
        self.kind = spec.kind

    def code_bytes(self) -> int:
        return self.spec.params["bits"] // 8

    def stored(self, ids):
        return None  # binary codes only

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        return np.packbits(self.codec.apply(as_floats(vectors)) > 0, axis=1)

    def add(self, ids, vectors) -> None:
        self.index.add_with_ids(self.codes(vectors), as_ids(ids))

    def search(self, queries, k, params, allowed=None, use_gpu=False):
        distances, found = self.index.search(self.codes(queries), k, params=_params(allowed=allowed))
        return np.cos(np.pi * distances / params["bits"]).astype(np.float32), found  # SimHash's cosine estimate

    def write(self, path: Path) -> None:
        writer = faiss.VectorIOWriter()
        faiss.write_VectorTransform(self.codec, writer)
        buffer = io.BytesIO()
        np.savez(buffer, codec=faiss.vector_to_array(writer.data), index=faiss.serialize_index_binary(self.index))
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def read(cls, path: Path, spec: IndexSpec, dim: int) -> Binary:
        with np.load(path) as parts:
            reader = faiss.VectorIOReader()
            faiss.copy_array_to_vector(np.ascontiguousarray(parts["codec"], dtype=np.uint8), reader.data)
            codec = faiss.read_VectorTransform(reader)
            index = faiss.deserialize_index_binary(parts["index"])
        return cls(spec, dim, index, codec)


BY_KIND: dict[str, type[Backend]] = {"flat": Flat, "ivf": IVF, "ivfpq": IVFPQ, "hnsw": HNSW}


def empty(spec: IndexSpec, dim: int) -> Backend:
    """An empty index of a kind that needs no training."""
    if spec.kind not in ("flat", "hnsw"):
        raise CrossmodalError(f"internal: a {spec.kind} index is made by training")
    return BY_KIND[spec.kind].empty(spec, dim)


def read(path: Path, spec: IndexSpec, dim: int) -> Backend:
    """The index in ``path``, wrapped for ``spec``'s kind; a file of another kind is :class:`WrongKind`, and so
    is one whose lists are in memory where the spec says on disk (``shards``), or the other way round."""
    sharded = bool(spec.params.get("shards"))
    if spec.kind in BINARY:
        backend = Binary.read(path, spec, dim)
        found, size = "binary", backend.index.d
    elif sharded:
        try:
            index = ondisk.read(path)
        except RuntimeError:  # faiss cannot skip in-memory lists: a whole file of them, or a damaged one
            faiss.read_index(str(path))
            index = None
        if index is None:
            raise WrongKind(f"{spec.kind} in memory")
        found, size = kind_of(index), index.d
        backend = BY_KIND[found](spec, dim, index, Path(path)) if found in ("ivf", "ivfpq") else None
        if backend is not None:
            backend.saved_lists = ondisk.data_file(index)
    else:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            if _on_disk_file(path):  # faiss maps the list file itself, and fails where it moved
                raise WrongKind(f"{spec.kind} on disk") from None
            raise
        found, size = kind_of(index), index.d
        if ondisk.is_on_disk(index):
            raise WrongKind(f"{found} on disk")
        backend = BY_KIND[found](spec, dim, index) if found in BY_KIND else None
    expected = "binary" if spec.kind in BINARY else spec.kind
    if found != expected or size != (spec.params.get("bits") if spec.kind in BINARY else dim):
        raise WrongKind(found)
    return backend


def _on_disk_file(path: Path) -> bool:
    try:
        return ondisk.read(path) is not None
    except RuntimeError:
        return False


class WrongKind(CrossmodalError):
    def __init__(self, found: str):
        super().__init__(found)
        self.found = found


def kind_of(index) -> str:
    if isinstance(index, faiss.IndexBinary):
        return "binary"
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return type(inner).__name__
    return "ivfpq" if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ) else "ivf"


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (the GPU build is ``pip install 'crossmodal-search[gpu]'``)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
