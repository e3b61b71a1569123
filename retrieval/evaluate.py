"""Recall@k of an index built with captions: through the index as built, and exact, side by side.

Queries are the stored vectors themselves (captions were encoded raw when indexed, so nothing is
encoded again). The image gallery is every image with a vector; the text gallery is every text
with a vector, standalone texts included, as a search would see them. Definitions are those of
:mod:`indexer.metrics` (CLIP_benchmark's).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.catalog import CAPTION
from indexer.errors import CrossmodalError
from indexer.metrics import (
    ann_agreement,
    first_hits,
    positive_ranks,
    summarise_ranks,
    texts_of_images,
    true_recall,
)
from indexer.store import IndexStore

DEFAULT_KS = (1, 5, 10)


@dataclass
class Evaluation:
    model: str
    index_kind: str
    counts: dict[str, int]
    text_to_image: dict = field(default_factory=dict)
    image_to_text: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _index_ranks(found: np.ndarray, positives: Sequence[set[int]], miss: int) -> np.ndarray:
    """1-based rank of the first positive id in each row of index results; ``miss`` when absent."""
    ranks = np.full(len(found), miss, dtype=np.int64)
    for row, (ids, wanted) in enumerate(zip(found, positives)):
        for position, item_id in enumerate(ids):
            if int(item_id) in wanted:
                ranks[row] = position + 1
                break
    return ranks


def _direction(store: IndexStore, target: str, queries: np.ndarray, gallery_ids: np.ndarray,
               gallery: np.ndarray, positives: list[list[int]], ks: Sequence[int], curve_k: int) -> dict:
    """Exact and through-the-index figures for one direction (positives are gallery row positions)."""
    ranks = positive_ranks(queries, gallery, positives)
    first = first_hits(ranks, len(gallery_ids) + 1)
    exact = summarise_ranks(first, ks)
    index, _ = store.load_vectors(target)
    k_max = min(max(*ks, curve_k), len(gallery_ids))
    start = time.perf_counter()
    _, found = index.search(queries, k_max)
    seconds = time.perf_counter() - start
    wanted = [{int(gallery_ids[p]) for p in pos} for pos in positives]
    index_first = _index_ranks(found, wanted, len(gallery_ids) + 1)
    through = summarise_ranks(index_first, ks)
    through.pop("mean_rank"), through.pop("median_rank")  # unknown beyond the k_max results asked for
    row_of = {int(i): r for r, i in enumerate(gallery_ids)}
    found_rows = np.vectorize(lambda i: row_of.get(int(i), -1), otypes=[np.int64])(found) if found.size else found
    agreement = ann_agreement(queries, gallery, found_rows, ks)
    figures = {"index": through, "exact": exact, "ann_agreement": agreement,
               "queries_per_second": round(len(queries) / max(seconds, 1e-9), 1)}
    if any(len(p) > 1 for p in positives):  # several correct items per query: image->text
        figures["exact"]["true_recall"] = true_recall(ranks, ks)
    if curve_k:  # R@1..curve_k, for plots
        figures["curve"] = {name: [float(np.mean(r <= k)) for k in range(1, curve_k + 1)]
                            for name, r in (("index", index_first), ("exact", first))}
    return figures


def evaluate_index(index_dir: Path, ks: Sequence[int] = DEFAULT_KS, curve_k: int = 0) -> Evaluation:
    """Text->image and image->text recall@k over the captions stored in an index.

    With ``curve_k``, each direction also gets ``curve``: R@1..curve_k for the index and exact search.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise CrossmodalError(f"k values must be positive integers, got {ks}")
    with IndexStore.open(index_dir) as store:
        catalog, dim = store.catalog, store.meta.embed_dim
        image_ids, text_ids = catalog.vector_ids("image"), catalog.vector_ids("text")
        image_row = {int(i): row for row, i in enumerate(image_ids)}
        texts = catalog.items(text_ids.tolist())
        caption_rows = [row for row, t in enumerate(text_ids)
                        if texts[int(t)].kind == CAPTION and texts[int(t)].image_id in image_row]
        if not caption_rows:
            raise CrossmodalError(f"the index at {index_dir} has no captions linked to indexed images; "
                                  "index a folder with sidecar captions or --captions FILE first")
        image_vectors = catalog.vectors(image_ids.tolist(), dim)
        text_vectors = catalog.vectors(text_ids.tolist(), dim)
        owner = [image_row[texts[int(text_ids[r])].image_id] for r in caption_rows]
        # positions among the caption queries, mapped back to rows of the whole text gallery
        captions_of = [[caption_rows[q] for q in qs] for qs in texts_of_images(owner, len(image_ids))]
        with_captions = [i for i, c in enumerate(captions_of) if c]
        duplicates = Counter(texts[int(text_ids[r])].text for r in caption_rows)
        counts = {
            "images": len(image_ids), "texts": len(text_ids), "caption_queries": len(caption_rows),
            "image_queries": len(with_captions), "images_without_captions": len(image_ids) - len(with_captions),
            "texts_without_image": len(text_ids) - len(caption_rows),
            "duplicate_captions": sum(n - 1 for n in duplicates.values() if n > 1),
        }
        result = Evaluation(store.identity.describe(), store.spec.kind, counts)
        result.text_to_image = _direction(store, "image", text_vectors[caption_rows], image_ids, image_vectors,
                                          [[o] for o in owner], ks, curve_k)
        result.image_to_text = _direction(store, "text", image_vectors[with_captions], text_ids, text_vectors,
                                          [captions_of[i] for i in with_captions], ks, curve_k)
    return result


def save_run(index_dir: Path, evaluation: Evaluation, source: str) -> int:
    """Keep ``evaluation`` in the index's catalog, with its model and index spec, for ``history_of``."""
    with IndexStore.open(index_dir) as store:
        return store.catalog.add_eval_run(evaluation.model, store.meta.index_spec, source, evaluation.as_dict())


def history_of(index_dir: Path) -> list:
    with IndexStore.open(index_dir) as store:
        return store.catalog.eval_runs()
