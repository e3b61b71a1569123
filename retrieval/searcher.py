"""Answer queries from an index: text or image in, ranked images or texts out.

:class:`Searcher` opens an index read-only, loads the model the index was built with (or checks
that the one given is the same), and searches the image or text vectors by cosine similarity.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.catalog import ItemView
from indexer.decode import DRAFT_FACTOR
from indexer.encoder import Encoder
from indexer.errors import QueryError
from indexer.filters import Filters, filtered_ids
from indexer.imageio import NotARegularFile, TooLarge, library_output, open_image, to_rgb
from indexer.spec import IndexSpec
from indexer.store import MODALITIES, IndexStore, encoder_for, identity_from_meta
from indexer.vectors import Allowed, VectorStore, gpu_wanted

from .fusion import answer_fused
from .hits import MAX_K, Answer, Hit
from .hybrid import answer_words
from .terms import KINDS as TERM_KINDS
from .terms import Term, check_terms

SEARCH_SETTINGS_OF = {"ivf": ("nprobe",), "ivfpq": ("nprobe", "rerank"), "hnsw": ("ef_search",),
                      "lsh": ("rerank",), "itq": ("rerank",)}
SEARCH_SETTINGS = {name for names in SEARCH_SETTINGS_OF.values() for name in names}


class Searcher:
    """Search one index. The model is loaded on the first text or image query.

    Safe to share between threads of a long-lived process: each query's notes come back with its
    :class:`Answer`, and the vectors of a modality are searched and updated under that modality's lock.
    :meth:`refresh` catches up with commits made by other processes (an indexer adding or removing).
    """

    def __init__(self, store: IndexStore, *, model: str | None = None, pretrained: str | None = None,
                 device: str = "auto", precision: str = "auto", encoder: Encoder | None = None,
                 settings: dict | None = None):
        self.store = store
        self.settings = _check_settings(store.spec, settings or {})  # search-time nprobe/ef_search/rerank
        self._model, self._pretrained, self._device, self._precision = model, pretrained, device, precision
        self._encoder = encoder
        if encoder is not None:
            store.identity.require_same(encoder.identity, f"query the index at {store.directory}")
        self._loading = threading.Lock()  # the encoder and the vector files are loaded once
        self._locks = {m: threading.Lock() for m in MODALITIES}
        self._vectors: dict[str, VectorStore] = {}
        self._problems: dict[str, str] = {}  # a damaged vector file, said with every answer from it
        self._seen = store.catalog.change_counter()
        self.filters: Filters | None = None  # set on a view made by filtered()
        self._admitted: dict[tuple, Allowed] = {}  # (filters, target, catalog version) -> ids; shared by views

    @classmethod
    def open(cls, index_dir: Path, read_only: bool = False, **kwargs) -> Searcher:
        store = IndexStore.open(Path(index_dir), read_only)
        try:
            return cls(store, **kwargs)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        with self._loading:
            if self._encoder is None:
                encoder = encoder_for(self.store.identity, self._model, self._pretrained, self._device,
                                      self._precision)
                self.store.identity.require_same(encoder.identity, f"query the index at {self.store.directory}")
                self._encoder = encoder
            return self._encoder

    def vectors(self, modality: str) -> VectorStore:
        if modality not in MODALITIES:
            raise QueryError(f"unknown target '{modality}': use image or text")
        with self._loading:
            if modality not in self._vectors:
                vectors, report = self.store.load_vectors(modality)
                if report.problem:
                    self._problems[modality] = f"{report.problem}; this search used the catalog's vectors instead"
                vectors.use_gpu = gpu_wanted(self._device)
                self._vectors[modality] = vectors
            return self._vectors[modality]

    def refresh(self) -> bool:
        """Take in what other processes committed since the last call; whether anything had changed.

        New vectors are added and removed ones dropped in memory, as opening the index again would; an
        index rebuilt as another type (``crossmodal reindex``) is loaded again from its files.
        """
        seen = self.store.catalog.change_counter()
        if seen == self._seen:
            return False
        self._seen = seen
        before = self.store.meta
        self.store.forget_meta()
        if self.store.meta != before:  # reindexed, or its model recorded anew: start from the files
            for lock in self._locks.values():
                lock.acquire()
            try:
                with self._loading:
                    self._vectors.clear()
                    self._problems.clear()
                    if self.store.identity != identity_from_meta(before):
                        self._encoder = None
                    self.settings = {k: v for k, v in self.settings.items() if k in self.store.spec.params}
            finally:
                for lock in self._locks.values():
                    lock.release()
            return True
        for modality in list(self._vectors):
            expected = self.store.catalog.vector_ids(modality)
            with self._locks[modality]:
                self._vectors[modality].sync(expected, self.store.fetch_vectors)
        return True

    # -- filters ------------------------------------------------------------------------------
    def filtered(self, filters: Filters | None) -> Searcher:
        """This searcher with ``filters`` applied inside every search (a view sharing the index, the model
        and the locks; every ``answer_*`` mode honours it). No filter, or an empty one: this searcher."""
        if filters is None or not filters.active:
            return self
        view = copy.copy(self)
        view.filters = filters
        return view

    def admitted(self, to: str) -> Allowed | None:
        """The ``to`` items the filters admit (None: no filter), cached until the catalog changes."""
        if self.filters is None:
            return None
        key = (self.filters, to, self.store.catalog.change_counter())
        found = self._admitted.get(key)
        if found is None:
            found = Allowed(filtered_ids(self.store.catalog, self.filters, to))
            if len(self._admitted) >= 32:
                self._admitted.clear()
            self._admitted[key] = found
        return found

    # -- queries ------------------------------------------------------------------------------
    def search_text(self, query: str, *, to: str = "image", k: int = 10) -> list[Hit]:
        return self.answer_text(query, to=to, k=k).hits

    def search_image(self, image: str | Path | Image.Image, *, to: str = "text", k: int = 10) -> list[Hit]:
        return self.answer_image(image, to=to, k=k).hits

    def answer_text(self, query: str, *, to: str = "image", k: int = 10, offset: int = 0,
                    settings: dict | None = None, mode: str = "vector") -> Answer:
        """The ``k`` best ``to`` items from rank ``offset`` on; ``settings`` override nprobe, ef_search or
        rerank for this query only (the other ``answer_*`` methods take the same page and settings).

        ``mode``: ``vector`` (the model), ``keyword`` (the words of captions, texts and file names),
        ``hybrid`` (both rankings fused; see :mod:`retrieval.hybrid`) or ``fused`` (images scored by
        their own vectors and their captions'; see :mod:`retrieval.fusion`).
        """
        if mode == "fused":  # images scored by their vectors and their captions' (retrieval/fusion.py)
            if to != "image":
                raise QueryError("the fused mode finds images (an image and its captions as one document)")
            _check_page(k, offset)
            return answer_fused(self, query, k=k, offset=offset, settings=settings)
        if mode != "vector":
            return answer_words(self, query, to=to, k=k, offset=offset, settings=settings, mode=mode)
        return self.answer_terms([Term(text=query)], to=to, k=k, offset=offset, settings=settings)

    def answer_image(self, image: str | Path | Image.Image, *, to: str = "text", k: int = 10,
                     offset: int = 0, settings: dict | None = None) -> Answer:
        """``image``: a path, or a PIL image already opened (and bounded) by the caller."""
        return self.answer_terms([Term(image=image)], to=to, k=k, offset=offset, settings=settings)

    def answer_item(self, item_id: int, *, to: str = "image", k: int = 10, offset: int = 0,
                    settings: dict | None = None) -> Answer:
        """More like an indexed item: its stored vector is the query, and the item itself is left out."""
        return self.answer_terms([Term(item=item_id)], to=to, k=k, offset=offset, settings=settings)

    def answer_vector(self, vector, *, to: str = "image", k: int = 10, offset: int = 0,
                      settings: dict | None = None) -> Answer:
        return self.answer_terms([Term(vector=vector)], to=to, k=k, offset=offset, settings=settings)

    def answer_terms(self, terms: Sequence[Term], *, to: str = "image", k: int = 10, offset: int = 0,
                     settings: dict | None = None) -> Answer:
        """A fused query: ``q = normalize(sum_i w_i * normalize(v_i))``.

        ``v_i`` is term i's text or image encoded by the index's model, an indexed item's stored
        vector, or a vector given as is; ``w_i`` its weight, negative for "less like this". Items used
        as terms are left out of the results. Raises :class:`QueryError` when the terms cancel out.
        """
        _check_page(k, offset)
        notes: list[str] = []
        timings: dict[str, float] = {}
        query = self.query_vector(terms, notes, timings)
        exclude = {term.item for term in terms if term.item is not None}
        return self._answer(query, to, k, offset, notes, timings, settings, exclude)

    def query_vector(self, terms: Sequence[Term], notes: list[str] | None = None,
                     timings: dict[str, float] | None = None) -> np.ndarray:
        """The unit query vector of ``terms`` (as :meth:`answer_terms` defines it); what there is to say
        about them goes to ``notes``, the seconds spent to ``timings``."""
        terms = list(terms)
        check_terms(terms)
        vectors = self._term_vectors(terms, [] if notes is None else notes, {} if timings is None else timings)
        weights = np.array([term.weight for term in terms], dtype=np.float32)
        query = weights @ vectors
        norm = float(np.linalg.norm(query))
        if norm <= 1e-6 * np.abs(weights).sum():
            raise QueryError("the query's terms cancel out (the same thing searched for and against): "
                             "change a weight or drop a term")
        return query / norm

    def _term_vectors(self, terms: list[Term], notes: list[str], timings: dict[str, float]) -> np.ndarray:
        """One unit vector per term, in order; texts and images are each encoded as one batch."""
        dim = self.store.meta.embed_dim
        out = np.zeros((len(terms), dim), dtype=np.float32)
        rows = {kind: [n for n, term in enumerate(terms) if term.kind == kind] for kind in TERM_KINDS}
        started = time.perf_counter()
        if rows["text"]:
            texts = [self._query_text(terms[n].text, notes) for n in rows["text"]]
            out[rows["text"]] = self.encoder.encode_texts(texts)
        if rows["image"]:
            images = [to_rgb(im) if isinstance(im, Image.Image) else self._query_image(Path(im), notes)
                      for im in (terms[n].image for n in rows["image"])]
            out[rows["image"]] = self.encoder.encode_pil(images)
        if rows["text"] or rows["image"]:
            timings["encode"] = time.perf_counter() - started
        if rows["item"]:
            started = time.perf_counter()
            ids = [terms[n].item for n in rows["item"]]
            stored = self.store.fetch_vectors(ids, strict=False)
            for item_id, row in zip(ids, stored):
                if np.isnan(row).any():
                    raise QueryError(f"no indexed item {item_id}: it was removed, skipped, or never there")
            out[rows["item"]] = stored
            timings["catalog"] = time.perf_counter() - started
        for n in rows["vector"]:
            vector = _checked_queries(terms[n].vector, dim)
            if len(vector) != 1:
                raise QueryError(f"a vector term is one vector; this one has {len(vector)} rows")
            out[n] = vector[0]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if (norms == 0).any():
            raise QueryError("a query vector is all zeros: it points nowhere")
        return out / norms

    def _query_text(self, text, notes: list[str]) -> str:
        if not isinstance(text, str) or not text.strip():
            raise QueryError("empty text query: give some words to search for")
        text = text.strip()
        cut = getattr(self.encoder, "text_overflow", lambda _: 0)(text)
        if cut:
            notes.append(f"the query is {cut} tokens longer than the model reads; only its start was used")
        return text

    def search_vectors(self, queries: np.ndarray, *, to: str = "image", k: int = 10) -> list[list[Hit]]:
        """Search with a batch of query vectors (N, dim); they are L2-normalised here."""
        _check_page(k, 0)
        return [hits for hits, _ in self._search(queries, to, k, {}, self.settings)[0]]

    def _answer(self, vector, to: str, k: int, offset: int, notes: list[str], timings: dict[str, float],
                settings: dict | None, exclude: set[int] = frozenset()) -> Answer:
        settings = {**self.settings, **_check_settings(self.store.spec, settings or {})}
        # One more than the page (and the excluded item): whether a next page exists.
        [(hits, more)], items = self._search(vector, to, offset + k + 1 + len(exclude), timings, settings, exclude)
        page = hits[offset:offset + k]
        if self.filters is not None and not hits:
            notes = notes + [f"no {to} matches the filters ({self.filters.describe()})"]
        if offset:  # hits are ranked from 1
            page = [replace(hit, rank=offset + i + 1) for i, hit in enumerate(page)]
        problem = self._problems.get(to)
        return Answer(page, notes + ([problem] if problem else []), timings, more or len(hits) > offset + k,
                      {hit.id: items[hit.id] for hit in page})

    def _search(self, queries, to: str, k: int, timings: dict[str, float], settings: dict,
                exclude: set[int] = frozenset()) -> tuple[list[tuple[list[Hit], bool]], dict[int, ItemView]]:
        """Per query: its hits, and whether the vectors held more than were asked for; and the items read."""
        queries = _checked_queries(queries, self.store.meta.embed_dim)
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1, norms)
        store = self.vectors(to)
        started = time.perf_counter()
        admitted = self.admitted(to)
        with self._locks[to]:
            held = len(store) if admitted is None else min(len(store), len(admitted))
            if held == 0:
                return [([], False) for _ in queries], {}
            scores, ids = store.search(queries, k, admitted, **settings)
        timings["search"] = timings.get("search", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
        items = self.store.catalog.items(np.unique(ids[ids >= 0]).tolist())
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits: list[Hit] = []
            for score, item_id in zip(row_scores, row_ids):
                item = items.get(int(item_id))
                if item is None or item.id in exclude:  # padding (-1), or deleted since the vectors were read
                    continue
                hits.append(Hit(len(hits) + 1, float(score), item.id, item.kind, item.path, item.text,
                                item.image_id, item.origin))
            results.append((hits, held > k))
        timings["catalog"] = timings.get("catalog", 0.0) + time.perf_counter() - started
        return results, items

    def _query_image(self, path: Path, notes: list[str]) -> Image.Image:
        draft_size = self.encoder.image_size * DRAFT_FACTOR  # loads the model first: its warnings are not the file's
        try:
            with library_output() as said:
                image = open_image(path, draft_size)
        except FileNotFoundError:
            raise QueryError(f"query image not found: {path}") from None
        except NotARegularFile as exc:  # reading a FIFO or a device would wait forever
            raise QueryError(f"cannot read query image {path}: it is {exc.kind}, not a regular file") from None
        except TooLarge as exc:
            raise QueryError(f"cannot read query image {path}: {exc.width}x{exc.height} is {exc.megapixels:.3g} "
                             f"megapixels, over the {exc.max_megapixels:g}-megapixel limit for query images") from None
        except Exception as exc:  # PIL raises many types for a file that is not an image
            raise QueryError(f"cannot read query image {path}: {exc}") from None
        notes += [f"query image: {line}" for line in said.capped()]
        return image


def _checked_queries(queries, dim: int) -> np.ndarray:
    """Query vectors as a float32 (N, dim) array, refused with a reason when that is not what they are."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise QueryError(f"query vectors have {queries.shape[-1]} dimensions, the index has {dim}")
    if not np.isfinite(queries).all():
        raise QueryError("query vectors hold NaN or infinite values")
    return queries


def _check_settings(spec: IndexSpec, settings: dict) -> dict:
    settings = {name: value for name, value in settings.items() if value is not None}
    for name, value in settings.items():
        if name not in SEARCH_SETTINGS or name not in spec.params:
            kinds = ", ".join(k for k, names in SEARCH_SETTINGS_OF.items() if name in names)
            raise QueryError(f"the index is {spec.kind}; {name} applies to {kinds or 'no index type'}")
        if not isinstance(value, int) or value < 1:
            raise QueryError(f"{name} must be a positive whole number, got {value!r}")
    return settings


def _check_page(k: int, offset: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise QueryError(f"k must be a positive number of results, got {k!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise QueryError(f"offset must be 0 or more, got {offset!r}")
    if k + offset > MAX_K:
        raise QueryError(f"k={k} from offset {offset} is too deep; ask for results up to the {MAX_K:,}th")
