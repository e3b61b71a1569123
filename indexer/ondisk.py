"""IVF indexes whose inverted lists live in a file beside the vector file, memory-mapped: indexes bigger than RAM.

A sharded build (``--shards N``) adds the vectors to copies of one trained, empty index one shard at a time,
writes each shard to a file, and merges the shards' lists into one list file (faiss's
``OnDiskInvertedLists.merge_from_multiple``, as ``faiss.contrib.ondisk.merge_ondisk`` does). The vector file
(``image.faiss``) then holds the coarse quantizer, the PQ tables and where each list lies; the lists are
in ``image.<writer pid>-<token>.ivfdata`` and are mapped, not read, so search needs RAM for the quantizer
and the lists it touches.

A list file is never changed once written: faiss's on-disk lists do not survive changes in place
(facebookresearch/faiss#3498: ``add_with_ids`` on them loses and doubles ids), and readers map the file.
A writer's changes wait in :class:`indexer.ondisk_changes.Changes` and are merged into a new list file of
its own; its save then names that file. A crash, or a reader in the middle of a search, meets the old
index whole; list files that no vector file names are removed at the next save.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from .errors import VectorFileError
from .layout import LIST_FILE_SUFFIX
from .processes import alive
from .quiet import quiet_stdout

ShardWriter = Callable[[np.ndarray, Path], list[Path]]  # (serialized trained index, folder) -> shard files
Chunks = Iterable[tuple[np.ndarray, np.ndarray]]  # (ids, vectors) batches
_WRITER = re.compile(r"\.(\d+)-[0-9a-f]+$")  # the writer's pid in image.<pid>-<token>.ivfdata


def lists_of(index: faiss.Index) -> faiss.InvertedLists:
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)


def is_on_disk(index: faiss.Index) -> bool:
    try:
        return isinstance(lists_of(index), faiss.OnDiskInvertedLists)
    except RuntimeError:  # not an IVF index
        return False


def data_file(index: faiss.Index) -> Path:
    return Path(lists_of(index).filename)


def read(path: Path) -> faiss.Index | None:
    """The index of a vector file whose lists are on disk, its list file mapped read-only; None when the
    file's lists are in the file itself (an in-memory index).

    faiss's own ``IO_FLAG_ONDISK_SAME_DIR`` would do this but prints to stdout, which is our JSON.
    Raises :class:`VectorFileError` when the list file it names is not beside it.
    """
    path = Path(path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = lists_of(index)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return None
    # The list file sits beside the vector file: the folder may have moved since it was written.
    lists.filename = str(path.parent / Path(lists.filename).name)
    lists.read_only = True
    if not Path(lists.filename).is_file():
        raise VectorFileError(f"the list file {lists.filename} that {path} names is missing; "
                              "`crossmodal verify --repair` rebuilds the index from the vectors in the catalog")
    if lists.totsize:
        lists.do_mmap()
    return index


def build(trained: faiss.Index, shards: Iterable[Chunks] | ShardWriter, home: Path) -> faiss.Index:
    """An on-disk index holding every ``(ids, vectors)`` chunk of every shard, its lists in a new list file
    beside ``home`` (the vector file it is for). Memory: one shard's codes at a time.

    ``shards`` may instead be a function that writes the shard files itself (on Ray: indexer.distributed).
    """
    work = work_dir(Path(home))
    try:
        if callable(shards):
            files = shards(faiss.serialize_index(trained), work)
        else:
            files = [write_shard(trained, chunks, work / f"shard-{i}.index") for i, chunks in enumerate(shards)]
        return merge(trained, files, home)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_shard(trained: faiss.Index, chunks: Chunks, out: Path) -> Path:
    """Add the chunks to a copy of the trained, empty index and write it to ``out`` (one shard)."""
    shard = empty_copy(trained)
    for ids, vectors in chunks:
        shard.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64))
    faiss.write_index(shard, str(out))
    return out


def write_serialized_shard(trained: np.ndarray, chunks: Chunks, out: Path, threads: int | None = None) -> Path:
    """:func:`write_shard` from a serialized trained index, in another process (a Ray task)."""
    if threads:
        faiss.omp_set_num_threads(threads)
    return write_shard(faiss.deserialize_index(trained), chunks, out)


def merge(trained: faiss.Index, shard_files: list[Path], home: Path) -> faiss.Index:
    """The trained index with the shards' lists merged into one new list file beside ``home``.

    Unlike ``faiss.contrib.ondisk.merge_ondisk``, the shards' indexes keep their lists and free them (and
    their maps of the shard files, which are deleted next) once merged.
    """
    index = empty_copy(trained)
    ivf = faiss.extract_index_ivf(index)
    path = new_data_path(home)
    shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in shard_files]
    sources = faiss.InvertedListsPtrVector()
    for shard in shards:
        sources.push_back(faiss.extract_index_ivf(shard).invlists)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    if sum(int(shard.ntotal) for shard in shards):
        with quiet_stdout():  # faiss prints each growth of the list file
            total = lists.merge_from_multiple(sources.data(), sources.size(), False)
    else:  # nothing to merge (every vector of a side removed): an empty list file, which faiss cannot map
        path.touch()
        total = 0
    index.ntotal = ivf.ntotal = total
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    del sources, shards
    return index


def trained_empty(index: faiss.Index) -> faiss.Index:
    """A copy of ``index``'s training (quantizer, PQ tables, OPQ rotation) with empty in-memory lists."""
    ivf = faiss.extract_index_ivf(index)
    lists, owned = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # so that swapping the lists out for the copy does not free them
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # Python's to free
    ivf.replace_invlists(empty, False)
    try:
        copy = empty_copy(index)
    finally:
        ivf.replace_invlists(lists, owned)
    copy.ntotal = faiss.extract_index_ivf(copy).ntotal = 0
    return copy


def empty_copy(trained: faiss.Index) -> faiss.Index:
    index = faiss.clone_index(trained)
    # No id -> list map: it would cost tens of bytes per vector in RAM; removals scan the lists instead.
    faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.NoMap)
    return index


def find_sorted(sorted_set: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, found): where each of ``values`` would sit in ``sorted_set``, and whether it is there.

    A binary search each: np.isin sorts both arrays on every call, which per list or per batch adds up.
    """
    if not len(sorted_set):
        return np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=bool)
    where = np.searchsorted(sorted_set, values).clip(0, len(sorted_set) - 1)
    return where, sorted_set[where] == values


def list_entries(lists: faiss.InvertedLists, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of one inverted list, copied out of faiss's memory."""
    size = lists.list_size(number)
    if not size:
        return np.zeros(0, dtype=np.int64), np.zeros((0, lists.code_size), dtype=np.uint8)
    codes_ptr = lists.get_codes(number)
    codes = faiss.rev_swig_ptr(codes_ptr, size * lists.code_size).copy().reshape(size, lists.code_size)
    lists.release_codes(number, codes_ptr)
    return list_ids_of(lists, number), codes


def list_ids_of(lists: faiss.InvertedLists, number: int) -> np.ndarray:
    size = lists.list_size(number)
    if not size:
        return np.zeros(0, dtype=np.int64)
    ids_ptr = lists.get_ids(number)
    ids = faiss.rev_swig_ptr(ids_ptr, size).copy().astype(np.int64)
    lists.release_ids(number, ids_ptr)
    return ids


def list_ids(lists: faiss.InvertedLists) -> np.ndarray:
    """Every id in the lists (codes are not read)."""
    held = [list_ids_of(lists, i) for i in range(lists.nlist) if lists.list_size(i)]
    return np.concatenate(held) if held else np.zeros(0, dtype=np.int64)


def write(index: faiss.Index, path: Path) -> None:
    """Write the vector file of an on-disk index, after its list file is on the disk for good."""
    fd = os.open(data_file(index), os.O_RDONLY)
    try:
        os.fsync(fd)  # the lists are written through a shared map: fsync flushes those pages too
    finally:
        os.close(fd)
    faiss.write_index(index, str(path))


def remove_unused(home: Path, keep: Path | None) -> None:
    """Delete what is ours beside ``home`` and no longer named: list files other than ``keep`` and build
    folders, of dead writers and our own. A live writer's stay: its coming save may name them.

    Liveness is by pid on this host: writers on other hosts sharing the folder would need their own folder.
    """
    home = Path(home)
    for found in [*home.parent.glob(f"{home.stem}.*{LIST_FILE_SUFFIX}"), *home.parent.glob(f".{home.stem}-shards-*")]:
        name = found.name[:-len(LIST_FILE_SUFFIX)] if found.suffix == LIST_FILE_SUFFIX else found.name
        writer = _WRITER.search(name.replace("-shards-", "."))
        if writer is None or (keep is not None and found.name == keep.name):
            continue  # not a file of ours, or the one the vector file names
        pid = int(writer.group(1))
        if pid != os.getpid() and alive(pid):
            continue
        if found.is_dir():
            shutil.rmtree(found, ignore_errors=True)
        else:
            found.unlink(missing_ok=True)  # readers that mapped it keep their map


def new_data_path(home: Path) -> Path:
    home = Path(home)
    return home.parent / f"{home.stem}.{os.getpid()}-{secrets.token_hex(4)}{LIST_FILE_SUFFIX}"


def work_dir(home: Path) -> Path:
    work = home.parent / f".{home.stem}-shards-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir()
    return work
