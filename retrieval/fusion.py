"""Late fusion: an image scored by its own vector and by its texts' vectors, and its evaluation.

For a text query ``q``, an image ``i`` with vector ``v_i`` and document texts ``T_i``:
``s_image = q·v_i``, ``s_text = max_{t in T_i} q·t``. The fusions, each a score per (query, image):

- ``weighted(a)``: ``a * s_image + (1 - a) * s_text``;
- ``rrf``: ``1 / (60 + rank_image) + 1 / (60 + rank_text)``, each rank among all images;
- ``attention(t)``: ``sum_m w_m * s_m`` with ``w = softmax(s / t)`` over the two modalities, so the
  modality that matches the query better weighs more.

``evaluate_fusion`` holds one caption of each image out as its document text and uses its other
captions as queries (no query is its own document), reporting text->image R@k (CLIP_benchmark's
definition: the share of queries whose image ranks within the top k) for image-only, text-only
and each fusion.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from indexer.catalog import CAPTION
from indexer.errors import CrossmodalError
from indexer.store import IndexStore

from .hits import MAX_K, Answer, Hit
from .hybrid import RRF_K
from .terms import Term

ALPHAS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
TEMPERATURES = (0.01, 0.03, 0.1)


def fused_scores(s_image: np.ndarray, s_text: np.ndarray, method: str, value: float | None = None) -> np.ndarray:
    """(queries, images) fused scores; see the module docstring for each ``method``."""
    if method == "image":
        return s_image
    if method == "text":
        return s_text
    if method == "weighted":
        return value * s_image + (1 - value) * s_text
    if method == "attention":
        stacked = np.stack([s_image, s_text]) / value
        weights = np.exp(stacked - stacked.max(axis=0))
        weights /= weights.sum(axis=0)
        return (weights * np.stack([s_image, s_text])).sum(axis=0)
    if method == "rrf":
        return 1.0 / (RRF_K + _ranks(s_image)) + 1.0 / (RRF_K + _ranks(s_text))
    raise CrossmodalError(f"unknown fusion {method!r}")


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each image in each row (descending score, ties by position)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, scores.shape[1] + 1)
    return ranks


def recall_at(scores: np.ndarray, truth: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@k: the share of rows whose ``truth`` column ranks within the top k (ties: the lower position first)."""
    mine = scores[np.arange(len(truth)), truth][:, None]
    columns = np.arange(scores.shape[1])[None, :]
    rank = 1 + ((scores > mine) | ((scores == mine) & (columns < truth[:, None]))).sum(axis=1)
    return {f"R@{k}": float(np.mean(rank <= k)) for k in ks}


def methods() -> list[tuple[str, str, float | None]]:
    """(label, method, value) of every fusion reported."""
    return ([("image only", "image", None), ("text only", "text", None)] +
            [(f"weighted a={a}", "weighted", a) for a in ALPHAS] + [("rrf", "rrf", None)] +
            [(f"attention t={t}", "attention", t) for t in TEMPERATURES])


def evaluate_fusion(index_dir: Path, ks: Sequence[int] = (1, 5, 10), block: int = 512) -> dict:
    """Text->image R@k per fusion, with the first caption of each image as its document text."""
    with IndexStore.open(index_dir) as store:
        catalog, dim = store.catalog, store.meta.embed_dim
        image_ids, text_ids = catalog.vector_ids("image"), catalog.vector_ids("text")
        row_of = {int(i): row for row, i in enumerate(image_ids)}
        texts = catalog.items(text_ids.tolist())
        captions: dict[int, list[int]] = {}
        for t in sorted(int(t) for t in text_ids):
            view = texts[t]
            if view.kind == CAPTION and view.image_id in row_of:
                captions.setdefault(view.image_id, []).append(t)
        usable = {image: ts for image, ts in captions.items() if len(ts) >= 2}
        if not usable:
            raise CrossmodalError(f"fusion needs images with two captions or more; the index at {index_dir} has none")
        kept = sorted(usable)
        images = catalog.vectors(kept, dim)
        documents = catalog.vectors([usable[i][0] for i in kept], dim)
        query_ids = [t for i in kept for t in usable[i][1:]]
        truth = np.array([n for n, i in enumerate(kept) for _ in usable[i][1:]])
        queries = catalog.vectors(query_ids, dim)
    totals: dict[str, np.ndarray] = {}
    for start in range(0, len(queries), block):
        s_image = queries[start:start + block] @ images.T
        s_text = queries[start:start + block] @ documents.T
        rows = truth[start:start + block]
        for label, method, value in methods():
            recall = recall_at(fused_scores(s_image, s_text, method, value), rows, ks)
            totals[label] = totals.get(label, 0) + np.array([recall[f"R@{k}"] for k in ks]) * len(rows)
    table = {label: {f"R@{k}": float(v / len(queries)) for k, v in zip(ks, total)} for label, total in totals.items()}
    return {"images": len(kept), "queries": len(queries), "ks": list(ks), "table": table}


# Best R@1 of `crossmodal eval --fusion` on the generated corpus with the demo model (README).
DEFAULT_FUSION = ("attention", 0.1)
CANDIDATES = 100  # images and captions read from each ranking before fusing


def answer_fused(searcher, query: str, *, k: int, offset: int = 0, settings: dict | None = None,
                 fusion: tuple[str, float | None] = DEFAULT_FUSION) -> Answer:
    """Text->image, each image scored by its vector and its captions' (``fusion``, module docstring).

    Candidates are the images of the best ``CANDIDATES`` images and of the best ``CANDIDATES``
    captions; an image without captions is scored by its vector alone.
    """
    notes: list[str] = []
    timings: dict[str, float] = {}
    q = searcher.query_vector([Term(text=query)], notes, timings)
    depth = min(max(offset + k + 1, CANDIDATES), MAX_K)  # the one more says whether a next page exists
    by_image = searcher.answer_vector(q, to="image", k=depth, settings=settings)
    by_text = searcher.answer_vector(q, to="text", k=depth, settings=settings)
    started = time.perf_counter()
    candidates = list(dict.fromkeys([h.id for h in by_image.hits] +
                                    [h.image_id for h in by_text.hits if h.image_id is not None]))
    catalog = searcher.store.catalog
    captions = catalog.captions_of(candidates)
    caption_ids = [c for image in candidates for c, _ in captions.get(image, [])]
    vectors = searcher.store.fetch_vectors(candidates + caption_ids, strict=False)
    s_image = vectors[:len(candidates)] @ q
    of_caption = dict(zip(caption_ids, vectors[len(candidates):] @ q))
    s_text = np.array([max((of_caption[c] for c, _ in captions.get(i, [])), default=np.nan) for i in candidates])
    s_text = np.where(np.isnan(s_text), s_image, s_text)  # no captions: the image's own score
    method, value = fusion
    scores = fused_scores(s_image[None, :], s_text[None, :], method, value)[0]
    order = [n for n in np.argsort(-scores, kind="stable") if not np.isnan(s_image[n])]
    page_ids = [candidates[n] for n in order[offset:offset + k]]
    items = catalog.items(page_ids)
    score_of = {candidates[n]: float(scores[n]) for n in order}
    hits = [Hit(offset + n + 1, score_of[i], i, items[i].kind, items[i].path, None, None, items[i].origin)
            for n, i in enumerate(page_ids) if i in items]
    timings["fusion"] = time.perf_counter() - started
    for key in ("search", "catalog"):
        timings[key] = by_image.timings.get(key, 0) + by_text.timings.get(key, 0)
    return Answer(hits, notes + by_image.notes, timings, len(order) > offset + k or by_image.has_more,
                  {hit.id: items[hit.id] for hit in hits})
