"""IVF indexes whose inverted lists live in a file beside the vector file, memory-mapped: indexes bigger than RAM.

A sharded build (``--shards N``) adds the vectors to copies of one trained, empty index one shard at a time,
writes each shard to a file, and merges the shards' lists into one list file with faiss's
``merge_ondisk``. The vector file (``image.faiss``) then holds the coarse quantizer, the PQ tables and
where each list lies; the lists are in ``image.<writer>.ivfdata`` and are mapped, not read, so search
needs RAM for the quantizer and the lists it touches.

A list file is never changed once written. faiss's on-disk lists do not survive changes in place
(facebookresearch/faiss#3498: ``add_with_ids`` on them loses and doubles ids), and readers map the
file. A writer's changes wait in :class:`Changes` (additions in a small in-memory index of the same
training, removals as a set of ids) and are merged, list by list, into a new list file of the writer's
own when it saves or searches; the save then names that file. A crash, or a reader in the middle of a
search, meets the old index whole; list files that no vector file names are removed at the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from .layout import LIST_FILE_SUFFIX


def lists_of(index) -> faiss.InvertedLists:
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)


def is_on_disk(index) -> bool:
    try:
        return isinstance(lists_of(index), faiss.OnDiskInvertedLists)
    except RuntimeError:  # not an IVF index
        return False


def data_file(index) -> Path:
    return Path(lists_of(index).filename)


def read(path: Path):
    """The index of a vector file whose lists are on disk, its list file mapped read-only; None when the
    file's lists are in the file itself (an in-memory index).

    faiss's own ``IO_FLAG_ONDISK_SAME_DIR`` would do this but prints to stdout, which is our JSON.
    """
    path = Path(path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = lists_of(index)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return None
    # The list file sits beside the vector file: the folder may have moved since it was written.
    lists.filename = str(path.parent / Path(lists.filename).name)
    lists.read_only = True
    if lists.totsize:
        lists.do_mmap()
    return index


ShardWriter = Callable[[np.ndarray, Path], list[Path]]  # (serialized trained index, folder) -> shard files


def build(trained, shards: Iterable[Iterable[tuple[np.ndarray, np.ndarray]]] | ShardWriter, home: Path) -> object:
    """An on-disk index holding every ``(ids, vectors)`` chunk of every shard, its lists in a new list file
    beside ``home`` (the vector file it is for). Memory: one shard's codes at a time.

    ``shards`` may instead be a function that writes the shard files itself (on Ray: indexer.distributed).
    """
    work = _work_dir(Path(home))
    try:
        if callable(shards):
            files = shards(faiss.serialize_index(trained), work)
        else:
            files = [write_shard(trained, chunks, work / f"shard-{i}.index") for i, chunks in enumerate(shards)]
        return merge(trained, files, home)
    finally:
        _remove_dir(work)


def write_serialized_shard(trained: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], out: Path,
                           threads: int | None = None) -> Path:
    """:func:`write_shard` from a serialized trained index, in another process (a Ray task)."""
    if threads:
        faiss.omp_set_num_threads(threads)
    return write_shard(faiss.deserialize_index(trained), chunks, out)


def write_shard(trained, chunks: Iterable[tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """Add the chunks to a copy of the trained, empty index and write it to ``out`` (one shard)."""
    shard = _empty_copy(trained)
    for ids, vectors in chunks:
        shard.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
    faiss.write_index(shard, str(out))
    return out


def merge(trained, shard_files: list[Path], home: Path):
    """The trained index with the shards' lists merged into one new list file beside ``home``."""
    index = _empty_copy(trained)
    with quiet_stdout():  # faiss prints each growth of the list file
        merge_ondisk(index, [str(f) for f in shard_files], str(new_data_path(home)))
    return index


class Changes:
    """Additions and removals waiting to be merged into a new list file (see the module's docstring)."""

    def __init__(self, index):
        self.index = index  # lists mapped from a file, never changed
        self.delta = None  # an in-memory index of the same training, holding the additions
        self.removed = np.zeros(0, dtype=np.int64)  # ids of the file's lists that are gone
        self._held: np.ndarray | None = None  # the file's ids, read once when first needed

    @property
    def changed(self) -> bool:
        return self.delta is not None or len(self.removed) > 0

    def held(self) -> np.ndarray:
        if self._held is None:
            self._held = np.sort(list_ids(lists_of(self.index)))
        return self._held

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self.removed) + (int(self.delta.ntotal) if self.delta else 0)

    def ids(self) -> np.ndarray:
        held = np.setdiff1d(self.held(), self.removed, assume_unique=True) if len(self.removed) else self.held()
        return held if self.delta is None else np.concatenate([held, list_ids(lists_of(self.delta))])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.delta is None:
            self.delta = trained_empty(self.index)
        self.delta.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        count = int(self.delta.remove_ids(ids)) if self.delta is not None else 0
        gone = np.setdiff1d(ids[np.isin(ids, self.held())], self.removed)
        self.removed = np.union1d(self.removed, gone)
        return count + len(gone)

    def applied(self, home: Path):
        """The index with the changes merged into a new list file beside ``home``."""
        return rewrite(self.index, home, self.removed, self.delta)


def rewrite(source, home: Path, removed: np.ndarray | None = None, delta=None, per_shard: int = 1_000_000):
    """``source``'s lists (in memory or mapped), less ``removed`` ids and plus ``delta``'s lists, in a new list
    file beside ``home``; read a group of lists at a time (``per_shard`` entries), so memory stays bounded."""
    home = Path(home)
    empty = trained_empty(source)
    sources = [lists_of(source)] + ([lists_of(delta)] if delta is not None else [])
    work = _work_dir(home)
    try:
        files, shard, count = [], None, 0
        for number in range(sources[0].nlist):
            if shard is None:
                shard, count = faiss.clone_index(empty), 0
            for lists in sources:
                ids, codes = list_entries(lists, number)
                if lists is sources[0] and removed is not None and len(removed) and len(ids):  # a delta re-adds
                    keep = ~np.isin(ids, removed)
                    ids, codes = ids[keep], codes[keep]
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
        _remove_dir(work)


def list_entries(lists, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of one inverted list, copied out of faiss's memory."""
    size = lists.list_size(number)
    if not size:
        return np.zeros(0, dtype=np.int64), np.zeros((0, lists.code_size), dtype=np.uint8)
    ids_ptr, codes_ptr = lists.get_ids(number), lists.get_codes(number)
    ids = faiss.rev_swig_ptr(ids_ptr, size).copy().astype(np.int64)
    codes = faiss.rev_swig_ptr(codes_ptr, size * lists.code_size).copy().reshape(size, lists.code_size)
    lists.release_ids(number, ids_ptr)
    lists.release_codes(number, codes_ptr)
    return ids, codes


def list_ids(lists) -> np.ndarray:
    held = [list_entries(lists, i)[0] for i in range(lists.nlist) if lists.list_size(i)]
    return np.concatenate(held) if held else np.zeros(0, dtype=np.int64)


def trained_empty(index):
    """A copy of ``index``'s training (quantizer, PQ tables, OPQ rotation) with empty in-memory lists."""
    ivf = faiss.extract_index_ivf(index)
    lists, owned = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # so that swapping the lists out for the copy does not free them
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # Python's to free
    ivf.replace_invlists(empty, False)
    try:
        copy = _empty_copy(index)
    finally:
        ivf.replace_invlists(lists, owned)
    copy.ntotal = faiss.extract_index_ivf(copy).ntotal = 0
    return copy


def write(index, path: Path) -> None:
    """Write the vector file of an on-disk index, after its list file is on the disk for good."""
    fd = os.open(data_file(index), os.O_RDONLY)
    try:
        os.fsync(fd)  # the lists are written through a shared map: fsync flushes those pages too
    finally:
        os.close(fd)
    faiss.write_index(index, str(path))


def remove_unused(home: Path, keep: Path | None) -> None:
    """Delete list files beside ``home`` other than ``keep``: those of dead writers and our own older ones.

    A live writer's file stays: it may be the one its coming save names.
    """
    for found in Path(home).parent.glob(f"{Path(home).stem}.*{LIST_FILE_SUFFIX}"):
        if keep is not None and found.name == keep.name:
            continue
        writer = found.name[len(Path(home).stem) + 1:].split("-", 1)[0]
        if writer.isdigit() and int(writer) != os.getpid() and _alive(int(writer)):
            continue
        found.unlink(missing_ok=True)  # readers that mapped it keep their map


def new_data_path(home: Path) -> Path:
    home = Path(home)
    return home.parent / f"{home.stem}.{os.getpid()}-{secrets.token_hex(4)}{LIST_FILE_SUFFIX}"


def _work_dir(home: Path) -> Path:
    work = home.parent / f".{home.stem}-shards-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir()
    return work


def _remove_dir(work: Path) -> None:
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()


def _empty_copy(trained):
    index = faiss.clone_index(trained)
    # No id -> list map: it would cost tens of bytes per vector in RAM; removals scan the lists instead.
    faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.NoMap)
    return index


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what C code printf()s to stdout (faiss's "resizing ..." lines) nowhere, for the block's length."""
    libc = ctypes.CDLL(None)
    if sys.stdout is not None:
        sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
