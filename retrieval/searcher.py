"""Answer queries from an index: text or image in, ranked images or texts out.

:class:`Searcher` opens an index read-only, loads the model the index was built with (or checks
that the one given is the same), and searches the image or text vectors by cosine similarity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.decode import DRAFT_FACTOR
from indexer.encoder import Encoder
from indexer.errors import QueryError
from indexer.imageio import NotARegularFile, TooLarge, library_output, open_image, to_rgb
from indexer.spec import IndexSpec
from indexer.store import MODALITIES, IndexStore, encoder_for
from indexer.vectors import VectorStore, gpu_wanted

MAX_K = 10_000
SEARCH_SETTINGS_OF = {"ivf": ("nprobe",), "ivfpq": ("nprobe", "rerank"), "hnsw": ("ef_search",),
                      "lsh": ("rerank",), "itq": ("rerank",)}
SEARCH_SETTINGS = {name for names in SEARCH_SETTINGS_OF.values() for name in names}


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    kind: str  # image, caption or text
    path: str | None  # absolute path of the image (a caption's image for captions)
    text: str | None
    image_id: int | None = None
    source: str | None = None  # where a caption or text came from

    def as_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Search one index. The model is loaded on the first text or image query."""

    def __init__(self, store: IndexStore, *, model: str | None = None, pretrained: str | None = None,
                 device: str = "auto", encoder: Encoder | None = None, settings: dict | None = None):
        self.store = store
        self.settings = _check_settings(store.spec, settings or {})  # search-time nprobe/ef_search/rerank
        self.notes: list[str] = []  # things the user should know about the last queries (a cut query)
        self._model, self._pretrained, self._device = model, pretrained, device
        self._encoder = encoder
        if encoder is not None:
            store.identity.require_same(encoder.identity, f"query the index at {store.directory}")
        self._vectors: dict[str, VectorStore] = {}

    @classmethod
    def open(cls, index_dir: Path, **kwargs) -> Searcher:
        store = IndexStore.open(Path(index_dir))
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
        if self._encoder is None:
            encoder = encoder_for(self.store.identity, self._model, self._pretrained, self._device)
            self.store.identity.require_same(encoder.identity, f"query the index at {self.store.directory}")
            self._encoder = encoder
        return self._encoder

    def vectors(self, modality: str) -> VectorStore:
        if modality not in MODALITIES:
            raise QueryError(f"unknown target '{modality}': use image or text")
        if modality not in self._vectors:
            vectors, report = self.store.load_vectors(modality)
            if report.problem:
                self.notes.append(f"{report.problem}; this search used the catalog's vectors instead")
            vectors.use_gpu = gpu_wanted(self._device)
            self._vectors[modality] = vectors
        return self._vectors[modality]

    # -- queries ------------------------------------------------------------------------------
    def search_text(self, query: str, *, to: str = "image", k: int = 10) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise QueryError("empty text query: give some words to search for")
        _check_k(k)
        cut = getattr(self.encoder, "text_overflow", lambda _: 0)(query.strip())
        if cut:
            self.notes.append(f"the query is {cut} tokens longer than the model reads; only its start was used")
        return self.search_vectors(self.encoder.encode_texts([query.strip()]), to=to, k=k)[0]

    def search_image(self, image: str | Path | Image.Image, *, to: str = "text", k: int = 10) -> list[Hit]:
        _check_k(k)
        image = self._query_image(Path(image)) if not isinstance(image, Image.Image) else to_rgb(image)
        return self.search_vectors(self.encoder.encode_pil([image]), to=to, k=k)[0]

    def _query_image(self, path: Path) -> Image.Image:
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
        self.notes += [f"query image: {line}" for line in said.capped()]
        return image

    def search_vectors(self, queries: np.ndarray, *, to: str = "image", k: int = 10) -> list[list[Hit]]:
        """Search with a batch of query vectors (N, dim); they are L2-normalised here."""
        _check_k(k)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        dim = self.store.meta.embed_dim
        if queries.shape[1] != dim:
            raise QueryError(f"query vectors have {queries.shape[1]} dimensions, the index has {dim}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1, norms)
        store = self.vectors(to)
        if len(store) == 0:
            return [[] for _ in queries]
        scores, ids = store.search(queries, k, **self.settings)
        items = self.store.catalog.items(np.unique(ids[ids >= 0]).tolist())
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits: list[Hit] = []
            for score, item_id in zip(row_scores, row_ids):
                item = items.get(int(item_id))
                if item is None:  # padding (-1) or deleted since the vector file was written
                    continue
                hits.append(Hit(len(hits) + 1, float(score), item.id, item.kind, item.path, item.text,
                                item.image_id, item.origin))
            results.append(hits)
        return results


def _check_settings(spec: IndexSpec, settings: dict) -> dict:
    settings = {name: value for name, value in settings.items() if value is not None}
    for name, value in settings.items():
        if name not in SEARCH_SETTINGS or name not in spec.params:
            kinds = ", ".join(k for k, names in SEARCH_SETTINGS_OF.items() if name in names)
            raise QueryError(f"the index is {spec.kind}; {name} applies to {kinds or 'no index type'}")
        if not isinstance(value, int) or value < 1:
            raise QueryError(f"{name} must be a positive whole number, got {value!r}")
    return settings


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k <= 0:
        raise QueryError(f"k must be a positive number of results, got {k}")
    if k > MAX_K:
        raise QueryError(f"k={k} is too large; ask for at most {MAX_K} results")
