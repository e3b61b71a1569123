"""The library behind ``crossmodal serve``: warm searchers, a bounded query pool, answers as plain data.

Nothing here knows HTTP. Routes in :mod:`.app` parse a request, call one method and turn the typed
errors (:class:`~indexer.errors.QueryError` 400, :class:`UploadTooLarge` 413,
:class:`~retrieval.serve.files.NotFound` 404, :class:`Busy` 503) into status codes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from indexer.decode import DRAFT_FACTOR
from indexer.errors import CrossmodalError, QueryError
from indexer.filters import Filters
from indexer.imageio import NotAnImage, TooLarge, open_image
from indexer.vectors import serial_in_this_thread

from ..duplicates import without_duplicates
from ..hybrid import check_mode
from ..searcher import MAX_K, SEARCH_SETTINGS, Answer, Searcher
from ..terms import Term
from .batching import BatchingEncoder
from .files import NotFound, Thumbnails, default_cache_dir, indexed_file
from .settings import ServeSettings

MAX_PAGE = 200
SETTING_MAX = {"nprobe": 4096, "ef_search": 4096, "rerank": 10_000}  # a query's cost stays bounded


class Busy(CrossmodalError):
    """Every worker is busy and the queue is full (HTTP 503 with Retry-After)."""


class UploadTooLarge(QueryError):
    """An uploaded query image over the byte limit (HTTP 413)."""


@dataclass(frozen=True)
class Query:
    """One search: exactly one of text, image (uploaded bytes), item (more like it), vector, or terms
    (a fused query, see :meth:`Searcher.answer_terms`); an uploaded image may come with terms too."""

    text: str | None = None
    image: bytes | None = None
    item: int | None = None
    vector: list[float] | None = None
    terms: tuple[Term, ...] | None = None
    to: str | None = None
    k: int = 24
    offset: int = 0
    settings: dict | None = None  # nprobe, ef_search, rerank for this query
    mode: str = "vector"  # or keyword, hybrid (a text query only)
    hide_duplicates: bool = False  # one of each group of near-identical hits
    filters: Filters | None = None  # metadata filters, applied inside the search

    def check(self) -> None:
        given = [name for name in ("text", "image", "item", "vector", "terms") if getattr(self, name) is not None]
        if len(given) != 1 and given != ["image", "terms"]:
            raise QueryError("give exactly one of text, image, item, vector or terms" +
                             (f" (got {', '.join(given)})" if given else ""))
        if self.to not in (None, "image", "text"):
            raise QueryError(f"to must be image or text, got {self.to!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_PAGE:
            raise QueryError(f"k must be between 1 and {MAX_PAGE}, got {self.k!r}")
        for name, value in (self.settings or {}).items():
            if name not in SEARCH_SETTINGS:
                raise QueryError(f"unknown search setting {name}: use {', '.join(sorted(SEARCH_SETTINGS))}")
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= SETTING_MAX[name]:
                raise QueryError(f"{name} must be between 1 and {SETTING_MAX[name]}, got {value!r}")
        check_mode(self.mode)
        if self.mode != "vector" and self.text is None:
            raise QueryError(f"the {self.mode} mode takes a text query")
        if not isinstance(self.offset, int) or not 0 <= self.offset <= MAX_K - self.k:
            raise QueryError(f"offset must be between 0 and {MAX_K - self.k}, got {self.offset!r}")

    @property
    def target(self) -> str:
        return self.to or ("text" if self.image is not None and not self.terms else "image")


class ServedIndex:
    """One index kept open read-only, with its searcher and thumbnails."""

    def __init__(self, name: str, directory: Path, searcher: Searcher, thumbnails: Thumbnails):
        self.name, self.directory = name, directory
        self.searcher, self.thumbnails = searcher, thumbnails

    @property
    def catalog(self):
        return self.searcher.store.catalog

    def describe(self) -> dict:
        store = self.searcher.store
        identity, spec = store.identity, store.spec
        counts = self.catalog.counts()
        settings = {k: v for k, v in spec.params.items() if k in SEARCH_SETTINGS}
        return {"name": self.name, "model": {"name": identity.name, "pretrained": identity.pretrained,
                                             "embed_dim": identity.embed_dim},
                "counts": {k: counts[k] for k in ("image", "caption", "text", "skipped")},
                "index_type": spec.kind, "description": spec.describe(), "settings": settings}

    def answer(self, query: Query, max_megapixels: float, decode: Callable) -> dict:
        searcher, to = self.searcher.filtered(query.filters), query.target
        terms = self._terms(query, max_megapixels, decode)

        def ask(k: int, offset: int = 0) -> Answer:
            if query.mode != "vector":
                return searcher.answer_text(query.text, to=to, k=k, offset=offset, settings=query.settings,
                                            mode=query.mode)
            return searcher.answer_terms(terms, to=to, k=k, offset=offset, settings=query.settings)

        answer = without_duplicates(searcher, ask, query.k, query.offset) if query.hide_duplicates else \
            ask(query.k, query.offset)
        return self._as_dict(answer, to, query)

    def _terms(self, query: Query, max_megapixels: float, decode: Callable) -> list[Term]:
        terms = list(query.terms or ())
        if query.text is not None:
            terms.insert(0, Term(text=query.text))
        elif query.item is not None:
            terms.insert(0, Term(item=query.item))
        elif query.vector is not None:
            terms.insert(0, Term(vector=query.vector))
        elif query.image is not None:
            draft = self.searcher.encoder.image_size * DRAFT_FACTOR
            terms.insert(0, Term(image=decode(query.image, draft, max_megapixels)))
        return terms

    def _as_dict(self, answer: Answer, to: str, query: Query) -> dict:
        started = time.perf_counter()
        image_ids = [h.id if h.kind == "image" else h.image_id for h in answer.hits]
        missing = [i for i in image_ids if i is not None and i not in answer.items]  # the images of caption hits
        images = {**answer.items, **self.catalog.items(missing)} if missing else answer.items
        captions = self.catalog.captions_of(list(images))
        hits = [self._hit(hit, images.get(image_id), captions.get(image_id, []))
                for hit, image_id in zip(answer.hits, image_ids)]
        timings = {**answer.timings, "catalog": answer.timings.get("catalog", 0) + time.perf_counter() - started}
        return {"index": self.name, "to": to, "k": query.k, "offset": query.offset, "has_more": answer.has_more,
                "notes": answer.notes, "timings_ms": {k: round(v * 1000, 3) for k, v in timings.items()},
                "hits": hits}

    def _hit(self, hit, image, captions: list[tuple[int, str]]) -> dict:
        local = image is not None and image.root is not None
        return {"id": hit.id, "kind": hit.kind, "score": hit.score, "rank": hit.rank,
                "path": _relative(image), "root": image.root if image else None,
                "image_id": image.id if image else None, "text": hit.text, "source": hit.source,
                "captions": [text for _, text in captions],
                "width": image.width if image else None, "height": image.height if image else None,
                "thumb": self._url("thumbs", image) if local else None,
                "file": self._url("files", image) if local else None}

    def _url(self, route: str, image) -> str:
        # The version changes when the file is indexed anew, so browsers may cache a URL for good.
        version = hashlib.sha256(f"{image.size}:{image.mtime_ns}".encode()).hexdigest()[:10]
        return f"/{route}/{image.id}?index={self.name}&v={version}"

    def item(self, item_id: int) -> dict:
        view = self.catalog.items([item_id]).get(item_id)
        if view is None:
            raise NotFound(f"no item {item_id} in index '{self.name}'")
        image_id = item_id if view.kind == "image" else view.image_id
        image = self.catalog.items([image_id]).get(image_id) if image_id is not None else None
        captions = self.catalog.captions_of([image_id]).get(image_id, []) if image_id is not None else []
        local = image is not None and image.root is not None
        return {"id": view.id, "kind": view.kind, "path": _relative(image), "root": image.root if image else None,
                "image_id": image_id, "text": view.text, "source": view.origin,
                "captions": [{"id": i, "text": t} for i, t in captions],
                "width": image.width if image else None, "height": image.height if image else None,
                "size_bytes": image.size if image else None, "photo": _photo(image),
                "thumb": self._url("thumbs", image) if local else None,
                "file": self._url("files", image) if local else None}

    def file(self, item_id: int) -> Path:
        return indexed_file(self.catalog.items([item_id]).get(item_id), item_id)

    def thumbnail(self, item_id: int, size: int) -> tuple[Path, str]:
        return self.thumbnails.get(self.catalog.items([item_id]).get(item_id), item_id, size)


def _photo(image) -> dict | None:
    """What the file's header said (indexer.photometa), the fields it had."""
    if image is None:
        return None
    found = {name: getattr(image, name) for name in ("format", "taken_at", "camera_make", "camera_model",
                                                      "orientation", "gps_lat", "gps_lon")}
    return {name: value for name, value in found.items() if value is not None}


def _relative(image) -> str | None:
    if image is None or image.path is None:
        return None
    if image.root is None:
        return image.path  # an address
    root = image.root.rstrip("/\\") + os.sep
    return image.path[len(root):] if image.path.startswith(root) else image.path


def decode_upload(data: bytes, draft_size: int, max_megapixels: float):
    """An uploaded query image as RGB, bounded like indexing's; a bomb or a non-image is a QueryError."""
    try:
        return open_image(io.BytesIO(data), draft_size, max_megapixels, name="the uploaded image")
    except TooLarge as exc:
        raise QueryError(f"the uploaded image is {exc.width}x{exc.height}, {exc.megapixels:.3g} megapixels, over "
                         f"the {exc.max_megapixels:g}-megapixel limit; send a smaller one") from None
    except NotAnImage:
        raise QueryError("the uploaded file is not an image in a format this server reads") from None
    except Exception as exc:  # PIL raises many types for a damaged file
        raise QueryError(f"the uploaded image cannot be decoded: {exc}") from None


class Service:
    """Every served index, a pool that bounds concurrent queries, and a thread that keeps indexes fresh."""

    def __init__(self, settings: ServeSettings, say: Callable[[str], None] = lambda line: None):
        self.settings = settings
        self.indexes: dict[str, ServedIndex] = {}
        self._encoders: dict[tuple, BatchingEncoder] = {}  # one per model, shared by its indexes
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="cm-query",
                                                           initializer=serial_in_this_thread)
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cm-upload")
        self._slots = threading.BoundedSemaphore(settings.workers + settings.queue)
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self._open(say)
        except BaseException:
            self.close()
            raise
        self._refresher = threading.Thread(target=self._refresh_loop, name="cm-refresh", daemon=True)
        self._refresher.start()

    def _open(self, say: Callable[[str], None]) -> None:
        cache = Path(self.settings.cache_dir or default_cache_dir())
        for name, directory in self.settings.indexes.items():
            started = time.perf_counter()
            searcher = Searcher.open(directory, read_only=True, model=self.settings.model,
                                     pretrained=self.settings.pretrained, device=self.settings.device,
                                     precision=self.settings.precision)
            identity = searcher.store.identity
            key = (identity.name, identity.pretrained, identity.checkpoint_sha256)
            if key not in self._encoders:
                self._encoders[key] = BatchingEncoder(lambda searcher=searcher: searcher.encoder)
            searcher = Searcher(searcher.store, encoder=self._encoders[key], device=self.settings.device)
            opened = time.perf_counter()
            for modality in ("image", "text"):
                searcher.vectors(modality)
            searcher.encoder.encode_texts(["warm up"])  # the first real query pays no one-time setup
            folder = cache / hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
            served = ServedIndex(name, Path(directory), searcher, Thumbnails(folder, self.settings.max_megapixels))
            self.indexes[name] = served
            counts = served.describe()["counts"]
            say(f"index '{name}' ({directory}): {identity.describe()}, {counts['image']:,} images, "
                f"{counts['caption'] + counts['text']:,} texts, {searcher.store.spec.describe()}; model loaded in "
                f"{opened - started:.2f}s, vectors in {time.perf_counter() - opened:.2f}s")

    def index(self, name: str | None) -> ServedIndex:
        if name is None or name == "":
            return next(iter(self.indexes.values()))
        if name not in self.indexes:
            raise NotFound(f"no index named '{name}': this server has {', '.join(self.indexes)}")
        return self.indexes[name]

    @property
    def in_flight(self) -> int:
        """Queries running or waiting for a worker."""
        return self._in_flight

    def submit(self, work: Callable, *args) -> concurrent.futures.Future:
        """Run ``work`` in the query pool, or raise :class:`Busy` when the queue is full."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is answering {self.settings.workers + self.settings.queue} queries already; "
                       "try again in a moment")
        with self._count_lock:
            self._in_flight += 1
        try:
            future = self._pool.submit(work, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        with self._count_lock:
            self._in_flight -= 1
        self._slots.release()

    def search(self, name: str | None, query: Query) -> dict:
        """Answer one query (call it in the pool: it encodes)."""
        query.check()
        served = self.index(name)
        if query.image is not None and len(query.image) > self.settings.max_upload_bytes:
            raise UploadTooLarge(f"the uploaded image has {len(query.image):,} bytes, over the "
                                 f"{self.settings.max_upload_bytes:,}-byte limit")
        return served.answer(query, self.settings.max_megapixels, self._decode)

    def _decode(self, data: bytes, draft_size: int, max_megapixels: float):
        future = self._decoder.submit(decode_upload, data, draft_size, max_megapixels)
        try:
            return future.result(timeout=self.settings.decode_timeout)
        except concurrent.futures.TimeoutError:
            raise QueryError(f"the uploaded image took over {self.settings.decode_timeout:g}s to decode; "
                             "send a smaller or simpler one") from None

    def _refresh_loop(self) -> None:
        serial_in_this_thread()
        while not self._stop.wait(self.settings.refresh_seconds):
            for served in list(self.indexes.values()):
                try:
                    served.searcher.refresh()
                except CrossmodalError:
                    pass  # a writer mid-change or a damaged file: the next round tries again

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        for served in self.indexes.values():
            served.searcher.close()
        for encoder in self._encoders.values():
            encoder.close()
