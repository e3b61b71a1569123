"""Near-duplicate images: groups of re-encoded, resized, lightly cropped or brightened copies.

Two images are linked when the cosine of their stored vectors is at least the threshold and one is
among the other's nearest neighbours; groups are the connected parts of those links (union-find),
so a chain of copies is one group. Images with the same content hash are exact duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from indexer.errors import QueryError
from indexer.store import IndexStore
from indexer.vectors import similar_pairs

from .hits import MAX_K, Answer, Hit

# Chosen with the demo model on generated images and their copies (bench/duplicates.py, README);
# another model places copies differently: `bench/duplicates.py --model NAME --pretrained W` measures it.
DEFAULT_THRESHOLD = 0.98
NEIGHBOURS = 16


@dataclass(frozen=True)
class Group:
    """Images that are copies of one another; ``keep`` is the one to show (the largest, then the first indexed)."""

    ids: tuple[int, ...]
    keep: int
    exact: bool  # every member has the same content hash
    min_score: float  # the weakest link that joined the group (1.0 for exact copies)
    paths: dict[int, str] = field(default_factory=dict, compare=False)


def find_groups(store: IndexStore, threshold: float = DEFAULT_THRESHOLD, neighbours: int = NEIGHBOURS,
                on_progress: Callable[[int, int], None] | None = None) -> list[Group]:
    """Every group of two or more near-identical indexed images, largest groups first."""
    catalog = store.catalog
    ids = catalog.vector_ids("image")
    vectors = store.fetch_vectors(ids) if len(ids) else np.zeros((0, store.meta.embed_dim), np.float32)
    hashes = catalog.content_hashes(ids.tolist())
    found = linked_rows(vectors, [hashes.get(int(i)) for i in ids], threshold, neighbours, on_progress)
    views = catalog.items([int(ids[row]) for rows, _ in found for row in rows])
    groups = []
    for rows, weakest in found:
        group_ids = [int(ids[row]) for row in rows]
        size = {i: (views[i].width or 0) * (views[i].height or 0) for i in group_ids if i in views}
        keep = max(group_ids, key=lambda i: (size.get(i, 0), -i))
        digests = {hashes.get(i) for i in group_ids}
        exact = len(digests) == 1 and None not in digests
        groups.append(Group(tuple(group_ids), keep, exact, 1.0 if exact else weakest,
                            {i: views[i].path for i in group_ids if i in views}))
    return sorted(groups, key=lambda g: (-len(g.ids), g.ids[0]))


def linked_rows(vectors: np.ndarray, hashes: list[str | None], threshold: float, neighbours: int = NEIGHBOURS,
                on_progress: Callable[[int, int], None] | None = None) -> list[tuple[list[int], float]]:
    """Groups of rows (two or more) linked by an equal hash or a cosine of at least ``threshold``
    among nearest neighbours, each with the weakest link that joined it."""
    if not 0 < threshold <= 1:
        raise QueryError(f"the threshold is a cosine similarity in (0, 1], got {threshold}")
    parent = list(range(len(vectors)))
    weakest = [1.0] * len(vectors)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(i: int, j: int, score: float) -> None:
        a, b = root(i), root(j)
        if a != b:  # a link inside a group already joined changes nothing
            parent[b] = a
            weakest[a] = min(weakest[a], weakest[b], score)

    first_of: dict[str, int] = {}
    for row, digest in enumerate(hashes):
        if digest is not None:
            if digest in first_of:
                link(first_of[digest], row, 1.0)
            else:
                first_of[digest] = row
    for i, j, score in similar_pairs(vectors, threshold, neighbours, on_block=on_progress):
        link(i, j, min(score, 1.0))
    members: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        members.setdefault(root(row), []).append(row)
    return [(rows, weakest[root(rows[0])]) for rows in members.values() if len(rows) > 1]


def without_duplicates(searcher, ask: Callable[[int], Answer], k: int, offset: int = 0,
                       threshold: float = DEFAULT_THRESHOLD) -> Answer:
    """The page ``[offset, offset + k)`` of an answer with near-duplicates hidden, as clip-front does.

    ``ask(depth)`` answers the same query from rank 1 to ``depth``. Walking down the ranking, a hit
    whose stored vector has a cosine of at least ``threshold`` with a hit already kept is left out,
    so the best-ranked copy stands for its group and the pages of one query never overlap.
    """
    depth = min(2 * (offset + k) + 10, MAX_K)
    while True:
        answer = ask(depth)
        vectors = searcher.store.fetch_vectors([hit.id for hit in answer.hits], strict=False)
        kept: list[Hit] = []
        kept_vectors: list[np.ndarray] = []
        for hit, vector in zip(answer.hits, vectors):
            if not np.isnan(vector).any():
                if kept_vectors and float(np.max(np.stack(kept_vectors) @ vector)) >= threshold:
                    continue
                kept_vectors.append(vector)
            kept.append(hit)
        if len(kept) > offset + k or not answer.has_more or depth >= MAX_K:
            break
        depth = min(depth * 4, MAX_K)
    page = [replace(hit, rank=offset + n + 1) for n, hit in enumerate(kept[offset:offset + k])]
    hidden = len(answer.hits) - len(kept)
    notes = answer.notes + ([f"near-duplicates of better-ranked results hidden ({hidden} of the first "
                             f"{len(answer.hits)})"] if hidden else [])
    return Answer(page, notes, answer.timings, len(kept) > offset + k or answer.has_more,
                  {hit.id: answer.items[hit.id] for hit in page if hit.id in answer.items})
