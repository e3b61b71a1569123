"""Retrieval recall@k, defined as CLIP_benchmark's ``zeroshot_retrieval.py`` defines it.

Lives in ``indexer`` because training reports validation recall; ``retrieval`` evaluation uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def positive_ranks(queries: np.ndarray, gallery: np.ndarray, positives: Sequence[Sequence[int]],
                   block: int = 1024) -> list[np.ndarray]:
    """1-based rank of every correct gallery item of every query (exact inner product).

    Items are ordered by descending score; ties are broken by gallery position, as a stable sort
    would. Scores are computed ``block`` queries at a time, so memory stays at ``block x
    len(gallery)`` floats however large the gallery and the query set are.
    """
    out: list[np.ndarray] = []
    order = np.arange(len(gallery))
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ gallery.T
        for row, score in enumerate(scores):
            pos = np.asarray(positives[start + row], dtype=np.int64)
            ranks = [np.count_nonzero(score > score[p]) + np.count_nonzero((score == score[p]) & (order < p)) + 1
                     for p in pos]
            out.append(np.asarray(ranks, dtype=np.int64))
    return out


def first_hits(ranks: Sequence[np.ndarray], miss: int) -> np.ndarray:
    """Each query's best rank among its correct items; ``miss`` for a query without one."""
    return np.array([r.min() if r.size else miss for r in ranks], dtype=np.int64)


def first_hit_ranks(queries: np.ndarray, gallery: np.ndarray, positives: Sequence[Sequence[int]],
                    block: int = 1024) -> np.ndarray:
    """Rank of the best-ranked correct item per query; ``len(gallery) + 1`` for a query without one."""
    return first_hits(positive_ranks(queries, gallery, positives, block), len(gallery) + 1)


def texts_of_images(text_image: Sequence[int], n_images: int) -> list[list[int]]:
    """For each image row, the positions of its texts (``text_image[t]`` is text ``t``'s image row)."""
    grouped: list[list[int]] = [[] for _ in range(n_images)]
    for t, i in enumerate(text_image):
        grouped[int(i)].append(t)
    return grouped


def true_recall(ranks: Sequence[np.ndarray], ks: Sequence[int]) -> dict[str, float]:
    """Per query, the share of its correct items within the top k, averaged over queries with any.

    For image->text this is "matched captions in top-k / captions of that image", as opposed to the
    CLIP-paper R@k, which asks for at least one.
    """
    ranks = [r for r in ranks if r.size]
    return {f"R@{k}": float(np.mean([np.mean(r <= k) for r in ranks])) if ranks else 0.0 for k in ks}


def recall_at_k(image_vectors: np.ndarray, text_vectors: np.ndarray, text_image: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Text->image and image->text recall@k over unit vectors, with mean and median first-hit rank.

    - text->image R@k: for every text, 1 if its own image is among the k highest-scoring images;
      averaged over texts.
    - image->text R@k: for every image, 1 if at least one of its texts is among the k
      highest-scoring texts; averaged over images that have a text (the CLIP paper's definition).
    - image->text ``true_recall`` R@k: per image, the share of its texts among the top k, averaged.

    ``text_image[t]`` is the row in ``image_vectors`` of text ``t``'s image.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    captions_of = texts_of_images(text_image, len(image_vectors))
    with_text = [i for i, c in enumerate(captions_of) if c]
    t2i = first_hit_ranks(text_vectors, image_vectors, [[i] for i in text_image])
    i2t = positive_ranks(image_vectors[with_text], text_vectors, [captions_of[i] for i in with_text])
    image_to_text = summarise_ranks(first_hits(i2t, len(text_vectors) + 1), ks)
    image_to_text["true_recall"] = true_recall(i2t, ks)
    return {"text_to_image": summarise_ranks(t2i, ks), "image_to_text": image_to_text}


def summarise_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@k (share of ranks <= k), mean and median rank, and the number of queries."""
    out = {f"R@{k}": float(np.mean(ranks <= k)) if len(ranks) else 0.0 for k in ks}
    out["mean_rank"] = float(ranks.mean()) if len(ranks) else 0.0
    out["median_rank"] = float(np.median(ranks)) if len(ranks) else 0.0
    out["queries"] = int(len(ranks))
    return out



def ann_agreement(queries: np.ndarray, gallery: np.ndarray, found: np.ndarray, ks: Sequence[int],
                  block: int = 1024) -> dict[str, float]:
    """Share of the exact top-k that an approximate search returned, for each k (1.0 = exact).

    ``found`` holds gallery row positions (-1 for missing) from the approximate search, best first.
    A returned item counts when its exact score is at least the exact k-th best score, so items
    tied at the boundary count whichever of them a search returns.
    """
    hits = {k: 0.0 for k in ks}
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ gallery.T
        rows = found[start:start + block]
        got = np.where(rows >= 0, np.take_along_axis(scores, np.maximum(rows, 0), axis=1), -np.inf)
        ordered = -np.sort(-scores, axis=1)
        for k in ks:
            k_eff = min(k, gallery.shape[0])
            kth = ordered[:, k_eff - 1:k_eff]
            hits[k] += float(np.sum(np.count_nonzero(got[:, :k_eff] >= kth - 1e-6, axis=1) / k_eff))
    return {f"@{k}": hits[k] / max(1, len(queries)) for k in ks}
