"""Keyword and hybrid answers to a text query: the catalog's full-text match, alone or fused with the model's.

``keyword`` ranks by BM25 over the words of captions, texts and images' file and folder names
(:func:`indexer.keywords.keyword_matches`), so a name the model never learnt, or a file name,
is found. ``hybrid`` fuses the model's ranking and the keyword ranking by reciprocal rank fusion.
"""

from __future__ import annotations

import time

from indexer.errors import QueryError
from indexer.keywords import keyword_matches

from .hits import MAX_K, Answer, Hit
from .terms import Term

MODES = ("vector", "keyword", "hybrid", "fused")  # fused: retrieval/fusion.py
RRF_K = 60  # Cormack, Clarke & Buettcher (2009): the constant that damps the weight of top ranks
HYBRID_DEPTH = 100  # how deep each ranking is read before fusing


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QueryError(f"unknown search mode {mode!r}: use {', '.join(MODES)}")


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """``score(d) = sum over rankings r that hold d of 1 / (k + rank_r(d))``, ranks from 1; best first.

    Ties keep the order in which items first appear (the first ranking's first).
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item_id in enumerate(ranking, 1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def answer_words(searcher, query: str, *, to: str, k: int, offset: int, settings: dict | None,
                 mode: str) -> Answer:
    """``searcher.answer_text`` in ``keyword`` or ``hybrid`` mode (same page and settings)."""
    check_mode(mode)
    if not isinstance(query, str) or not query.strip():
        raise QueryError("empty text query: give some words to search for")
    if to not in ("image", "text"):
        raise QueryError(f"unknown target '{to}': use image or text")
    depth = offset + k + 1  # one more than the page: whether a next page exists
    notes: list[str] = []
    timings: dict[str, float] = {}
    items: dict = {}
    started = time.perf_counter()
    words = keyword_matches(searcher.store.catalog, query, to, depth if mode == "keyword" else
                            max(depth, HYBRID_DEPTH), searcher.filters)
    timings["keyword"] = time.perf_counter() - started
    if mode == "keyword":
        ranked = words
    else:
        model = searcher.answer_terms([Term(text=query)], to=to, k=min(max(depth, HYBRID_DEPTH), MAX_K),
                                      settings=settings)
        notes += model.notes
        timings.update(model.timings)
        items.update(model.items)
        ranked = reciprocal_rank_fusion([[hit.id for hit in model.hits], [item_id for item_id, _ in words]])
    started = time.perf_counter()
    wanted = [item_id for item_id, _ in ranked[:depth] if item_id not in items]
    items.update(searcher.store.catalog.items(wanted) if wanted else {})
    live = [(item_id, score) for item_id, score in ranked
            if item_id in items and items[item_id].error is None]  # gone or skipped since the match
    hits = [Hit(offset + n + 1, float(score), item.id, item.kind, item.path, item.text, item.image_id, item.origin)
            for n, (item, score) in enumerate((items[i], s) for i, s in live[offset:offset + k])]
    timings["catalog"] = timings.get("catalog", 0.0) + time.perf_counter() - started
    if not words:
        notes.append("no caption, text or file name has these words" + (": the answer is the model's alone"
                                                                          if mode == "hybrid" else ""))
    return Answer(hits, notes, timings, len(live) > offset + k, {hit.id: items[hit.id] for hit in hits})
