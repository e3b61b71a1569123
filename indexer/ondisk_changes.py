"""A writer's changes to an on-disk index (:mod:`indexer.ondisk`), kept aside and merged into a new list file.

Additions go to a small in-memory index of the same training, removals are marked on the file's ids;
:meth:`Changes.applied` writes the lists again, a group at a time, less what was removed and with what
was added, and merges them into a new list file. The file the index maps is never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np

from .ondisk import empty_copy, find_sorted, list_entries, list_ids, lists_of, merge, trained_empty, work_dir

SHARD_BYTES = 256 * 2**20  # codes and ids of lists written to one shard file at a time when rewriting


class Changes:
    """Additions and removals waiting to be merged into a new list file."""

    def __init__(self, index: faiss.Index):
        self.index = index  # lists mapped from a file, never changed
        self.delta: faiss.Index | None = None  # an in-memory index of the same training: the additions
        self._held: np.ndarray | None = None  # the file's ids, sorted; read once, when first needed
        self._gone: np.ndarray | None = None  # marks over _held: removed since the file was written

    @property
    def changed(self) -> bool:
        return (self.delta is not None and self.delta.ntotal > 0) or self.removed_count() > 0

    def pending_bytes(self) -> int:
        """Memory the additions take (codes and ids)."""
        if self.delta is None:
            return 0
        return int(self.delta.ntotal) * (faiss.extract_index_ivf(self.delta).code_size + 8)

    def removed_count(self) -> int:
        return 0 if self._gone is None else int(self._gone.sum())

    def held(self) -> np.ndarray:
        if self._held is None:
            self._held = np.sort(list_ids(lists_of(self.index)))
            self._gone = np.zeros(len(self._held), dtype=bool)
        return self._held

    def removed(self) -> np.ndarray:
        return self.held()[self._gone] if self._gone is not None else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.index.ntotal) - self.removed_count() + (int(self.delta.ntotal) if self.delta else 0)

    def ids(self) -> np.ndarray:
        held = self.held()[~self._gone]  # a copy: the cache stays ours
        return held if self.delta is None else np.concatenate([held, list_ids(lists_of(self.delta))])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.delta is None:
            self.delta = trained_empty(self.index)
        self.delta.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        count = int(self.delta.remove_ids(ids)) if self.delta is not None and self.delta.ntotal else 0
        where, present = find_sorted(self.held(), ids)
        found = np.unique(where[present & ~self._gone[where]]) if len(self._gone) else where[:0]
        self._gone[found] = True
        return count + len(found)

    def applied(self, home: Path) -> faiss.Index:
        """The index with the changes merged into a new list file beside ``home``."""
        return rewrite(self.index, home, self.removed(), self.delta)


def rewrite(source: faiss.Index, home: Path, removed: np.ndarray | None = None, delta: faiss.Index | None = None,
            shard_bytes: int = SHARD_BYTES) -> faiss.Index:
    """``source``'s lists (in memory or mapped), less the ``removed`` ids (sorted) and plus ``delta``'s lists,
    in a new list file beside ``home``; a group of lists at a time (``shard_bytes``), so memory stays bounded."""
    empty = trained_empty(source)
    code_size = faiss.extract_index_ivf(source).code_size
    per_shard = max(1, shard_bytes // (code_size + 8))
    sources = [lists_of(source)] + ([lists_of(delta)] if delta is not None else [])
    removed = removed if removed is not None else np.zeros(0, dtype=np.int64)
    work = work_dir(Path(home))
    try:
        files, shard, count = [], None, 0
        for number in range(sources[0].nlist):
            if shard is None:
                shard, count = empty_copy(empty), 0
            for lists in sources:
                ids, codes = list_entries(lists, number)
                if lists is sources[0] and len(removed) and len(ids):  # not the delta's: it may re-add an id
                    keep = ~find_sorted(removed, ids)[1]
                    ids, codes = ids[keep], np.ascontiguousarray(codes[keep])
                if len(ids):
                    lists_of(shard).add_entries(number, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                    count += len(ids)
            if count >= per_shard or number == sources[0].nlist - 1:
                shard.ntotal = faiss.extract_index_ivf(shard).ntotal = count
                files.append(work / f"shard-{len(files)}.index")
                faiss.write_index(shard, str(files[-1]))
                shard = None
        return merge(empty, files, home)
    finally:
        shutil.rmtree(work, ignore_errors=True)

