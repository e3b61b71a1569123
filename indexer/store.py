"""An index on disk: a directory with ``catalog.sqlite``, ``image.faiss``, ``text.faiss`` and a lock.

:class:`IndexStore` ties the catalog (truth) to the vector files (derived, re-synced from the
catalog whenever they disagree) and checks that the model in use is the one the index was built with.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .catalog import Catalog, IndexMeta, utc_now
from .errors import CatalogDamaged, CrossmodalError, IndexLocked, IndexNotFound, VectorFileError
from .identity import ModelIdentity
from .layout import CATALOG_FILE, LIST_FILE_SUFFIX, LOCK_FILE, MODALITIES
from .location import bind_catalog, bound_catalog, catalog_location
from .spec import MIN_TRAIN, IndexSpec
from .vectors import StaleVectorFile, VectorStore

WRITERS = "writers"  # the advisory lock every writer shares and reindex/verify take alone

if TYPE_CHECKING:  # the encoder module imports torch: only the functions that load a model import it
    from .encoder import Encoder


@dataclass(frozen=True)
class SyncReport:
    added: int
    removed: int
    problem: str | None = None  # the vector file could not be read and was rebuilt from the catalog in memory


def identity_from_meta(meta: IndexMeta) -> ModelIdentity:
    return ModelIdentity(name=meta.model_name, pretrained=meta.pretrained, embed_dim=meta.embed_dim,
                         checkpoint_sha256=meta.checkpoint_sha256, checkpoint_path=meta.checkpoint_path,
                         open_clip_version=meta.open_clip_version)


class IndexStore:
    """Open with :meth:`open` (read) or :meth:`open_for_writing` (creates if needed).

    Writers: with a SQLite catalog one process at a time holds the folder's lock; with a PostgreSQL
    catalog many index at once (one per root), each holding advisory locks in the database, and only
    ``reindex``/``verify`` (:meth:`open_locked`) have the catalog to themselves.
    """

    def __init__(self, directory: Path, catalog: Catalog, lock_fd: int | None = None, locks: tuple = ()):
        self.directory = directory
        self.catalog = catalog
        self._lock_fd = lock_fd
        self._locks = list(locks)  # PostgreSQL advisory locks held while this store is open
        self.writable = lock_fd is not None or bool(locks)
        self.created = False  # by this open_for_writing: a refused first run leaves no model or type behind

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, read_only: bool = False) -> IndexStore:
        """An existing index for reading; ``read_only`` also makes its catalog unwritable (a server)."""
        directory = Path(directory)
        location = catalog_location(directory)
        if isinstance(location, Path) and not location.is_file():
            raise IndexNotFound(
                f"no index at {directory}: build one with `crossmodal index FOLDER --index {directory}` "
                "(or set CROSSMODAL_INDEX)"
            )
        store = cls(directory, Catalog(location, read_only))
        try:
            if store.catalog.meta() is None and store._meta_after_files() is None:
                if isinstance(location, str) and bound_catalog(directory) is None:  # only $CROSSMODAL_CATALOG
                    raise IndexNotFound(f"no index at {directory}: build one with `crossmodal index FOLDER "
                                        f"--index {directory}`")
                raise IndexNotFound(f"the index at {directory} is empty: no run has finished writing its model yet")
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_for_writing(cls, directory: Path, identity: ModelIdentity, spec: IndexSpec | None = None) -> IndexStore:
        """Lock the index, create it for ``identity`` if new, refuse if it was built with another model.

        ``spec`` is the index type for a new index (None: flat); an existing index keeps its own and
        refuses a different one, which is what ``crossmodal reindex`` is for.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CrossmodalError(f"cannot create index directory {directory}: {exc.strerror or exc}") from exc
        store = cls._writer(directory, exclusive=False)
        try:
            setup = store.catalog.lock("setup", wait=True)  # the first writers of a new catalog: one creates it
            try:
                store._set_up(identity, spec)
            finally:
                if setup is not None:
                    setup.release()
        except BaseException:
            store.close()
            raise
        return store

    def _set_up(self, identity: ModelIdentity, spec: IndexSpec | None) -> None:
        meta = self.catalog.meta() or self._meta_after_files()
        if meta is None:
            self.catalog.set_meta(IndexMeta(
                identity.name, identity.pretrained, identity.checkpoint_sha256, identity.checkpoint_path,
                identity.embed_dim, identity.open_clip_version, (spec or IndexSpec()).to_json(), utc_now()))
            self.created = True
            return
        identity_from_meta(meta).require_same(identity, f"add to the index at {self.directory}")
        _require_same_kind(IndexSpec.from_json(meta.index_spec), spec, self.directory)
        if identity.checkpoint_path and identity.checkpoint_path != meta.checkpoint_path:
            # Same weights found at a new place: remember it so search can load them again.
            self.catalog.set_meta(IndexMeta(**{**meta.__dict__, "checkpoint_path": identity.checkpoint_path}))

    @classmethod
    def open_locked(cls, directory: Path) -> IndexStore:
        """An existing index, locked for writing without a model (reindex, verify): no other writer at all."""
        directory = Path(directory)
        cls.open(directory).close()  # the same clear errors for a missing or empty index
        return cls._writer(directory, exclusive=True)

    @classmethod
    def _writer(cls, directory: Path, exclusive: bool) -> IndexStore:
        location = catalog_location(directory)
        if isinstance(location, Path):  # SQLite: the folder's lock, for the whole run
            lock_fd = _acquire_lock(directory)
            try:
                return cls(directory, Catalog(location), lock_fd)
            except BaseException:
                os.close(lock_fd)
                raise
        catalog = Catalog(location)
        try:
            writers = catalog.lock(WRITERS, shared=not exclusive)
            bind_catalog(directory, location)  # from $CROSSMODAL_CATALOG: later commands find it without
        except BaseException:
            catalog.close()
            raise
        for path in leftover_temp_files(directory):  # temp files of dead processes on this machine
            path.unlink(missing_ok=True)
        return cls(directory, catalog, locks=(writers,))

    def lock_root(self, root: Path) -> None:
        """Claim ``root`` for this run: two runs indexing one folder into one catalog would add its files twice.
        (With SQLite the folder's lock already allows one run at a time.)"""
        lock = self.catalog.lock(f"root:{root}")
        if lock is not None:
            self._locks.append(lock)

    def _meta_after_files(self) -> IndexMeta | None:
        """For a catalog read as recording no model: the model it records now, or None when it still records
        none and no vector files are there. The model is recorded before any vector is written, so vector
        files beside a catalog that, read after them, still records none mean it was emptied or replaced:
        CatalogDamaged. Files first, then the model: a first writer of a shared catalog may record its
        model and write its files between the caller's read and this look."""
        held = [self.vector_path(m).name for m in MODALITIES if self.vector_path(m).exists()]
        meta = self.catalog.meta()
        if meta is None and held:
            raise CatalogDamaged(self.catalog.where, [f"it records no index, yet {held[0]} is there"])
        return meta

    def set_spec(self, spec: IndexSpec) -> None:
        """Record the index type (after a reindex, or once auto has chosen and tuned one)."""
        self.catalog.set_meta(IndexMeta(**{**self.meta.__dict__, "index_spec": spec.to_json()}))
        self.forget_meta()

    def close(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()
        self.catalog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds ------------------------------------------------------------------------
    @functools.cached_property
    def meta(self) -> IndexMeta:
        # Read once: only open_for_writing changes it, before anything reads it. A long-lived reader that
        # sees the catalog change calls forget_meta (another process may have reindexed).
        meta = self.catalog.meta()
        if meta is None:
            raise IndexNotFound(f"the index at {self.directory} records no model any more")
        return meta

    def forget_meta(self) -> None:
        self.__dict__.pop("meta", None)

    @property
    def identity(self) -> ModelIdentity:
        return identity_from_meta(self.meta)

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_json(self.meta.index_spec)

    def vector_path(self, modality: str) -> Path:
        return self.directory / f"{modality}.faiss"

    def load_vectors(self, modality: str) -> tuple[VectorStore, SyncReport]:
        """The modality's vector index, brought in line with the catalog in memory.

        A file of another kind than the catalog's spec (a reindex cut short) is ignored: the vectors
        are taken from the catalog again, and the next write trains and saves the right kind. So is a
        damaged file, which the report then names; the next write replaces it.
        """
        path, spec, dim = self.vector_path(modality), self.spec, self.meta.embed_dim
        vectors, problem = VectorStore.empty(spec, dim), None
        if path.exists():
            try:
                vectors = VectorStore.load(path, spec, dim)
            except StaleVectorFile:
                pass
            except VectorFileError as exc:  # derived data: rebuilt from the catalog like a missing file
                problem = str(exc)
        if vectors.dim != dim:
            raise CrossmodalError(f"{path} holds {vectors.dim}-d vectors but the catalog says {dim}-d; "
                                  "delete the file and re-run `crossmodal index` to rebuild it from the catalog")
        if self._rebuild_on_disk(vectors, modality):
            from .build import sharded  # build imports this module

            vectors = sharded(self, modality, spec)
            vectors.exact = functools.partial(self.fetch_vectors, strict=False)
            return vectors, SyncReport(len(vectors), 0, problem)  # added: the caller saves it
        vectors.exact = functools.partial(self.fetch_vectors, strict=False)  # re-ranking tolerates deletions
        if vectors.on_disk and not self.writable:
            # Catching up would copy the whole list file: a reader searches what the last writer saved
            # (re-ranking drops what was deleted since), and the writer's next save brings the rest.
            return vectors, SyncReport(0, 0, problem)
        expected = self.catalog.vector_ids(modality)
        added, removed = vectors.sync(expected, self.fetch_vectors)
        return vectors, SyncReport(added, removed, problem)

    def _rebuild_on_disk(self, vectors: VectorStore, modality: str) -> bool:
        """Whether a writer must build a ``shards`` index from the catalog: its file is missing, stale or
        damaged, and catching up in memory would hold every vector."""
        spec = self.spec
        return (self.writable and bool(spec.params.get("shards")) and not vectors.trained
                and self.catalog.vector_count(modality) >= MIN_TRAIN[spec.kind])

    def fetch_vectors(self, ids, strict: bool = True) -> np.ndarray:
        """Stored (full, exact) vectors for catalog ids, in that order."""
        return self.catalog.vectors(np.asarray(ids).tolist(), self.meta.embed_dim, strict)

    def iter_vectors(self, modality: str, batch: int = 50_000, first: int = 0, last: int | None = None):
        """Stored (ids, vectors) of a modality in id order, ``batch`` at a time (:meth:`Catalog.iter_vectors`)."""
        return self.catalog.iter_vectors(modality, self.meta.embed_dim, batch, first, last)

    def save_vectors(self, modality: str, vectors: VectorStore) -> None:
        if not self.writable:
            raise CrossmodalError("internal: vectors saved through a read-only IndexStore")
        try:
            if self._lock_fd is not None:
                vectors.save(self.vector_path(modality))
                return
            with _folder_lock(self.directory):  # writers of one PostgreSQL catalog may share this folder
                if self.catalog.vector_count(modality) != len(vectors):
                    # Others wrote the catalog meanwhile: save their vectors too, or every reader fetches them.
                    # (Were it equal by chance, the file is behind, which each load mends as it always does.)
                    vectors.sync(self.catalog.vector_ids(modality), self.fetch_vectors)
                vectors.save(self.vector_path(modality))
        except (OSError, RuntimeError) as exc:
            raise CrossmodalError(f"cannot write {self.vector_path(modality)}: {exc}; "
                                  "the previous file is unchanged") from exc

    def disk_usage(self) -> dict[str, int]:
        names = [CATALOG_FILE, CATALOG_FILE + "-wal"] + [f"{m}.faiss" for m in MODALITIES]
        names += sorted(p.name for m in MODALITIES for p in self.directory.glob(f"{m}.*{LIST_FILE_SUFFIX}"))
        return {n: (self.directory / n).stat().st_size for n in names if (self.directory / n).exists()}

    def info(self) -> dict:
        """What ``crossmodal info`` shows: model, counts, index kind, sizes, schema."""
        meta = self.meta
        loaded = {m: self.load_vectors(m) for m in MODALITIES}
        return {
            "index": str(self.directory.resolve()),
            "catalog": self.catalog.where,  # the SQLite file, or the PostgreSQL URL without its password
            "model": {"name": meta.model_name, "pretrained": meta.pretrained,
                      "checkpoint_sha256": meta.checkpoint_sha256, "checkpoint_path": meta.checkpoint_path,
                      "embed_dim": meta.embed_dim, "open_clip_version": meta.open_clip_version},
            "index_spec": json.loads(meta.index_spec),
            "counts": self.catalog.counts(),
            "precisions": self.catalog.precisions(),
            "vectors": {m: len(vectors) for m, (vectors, _) in loaded.items()},
            "notes": [report.problem for _, report in loaded.values() if report.problem],
            "roots": self.catalog.roots(),
            "disk_bytes": self.disk_usage(),
            "schema_version": self.catalog.schema_version(),
            "created_at": meta.created_at,
        }


def encoder_for(identity: ModelIdentity | None, model: str | None = None, pretrained: str | None = None,
                device: str = "auto", precision: str = "auto") -> Encoder:
    """The model to use with an index built by ``identity`` (None: a new index).

    Without ``model`` that is the index's own model; ``pretrained`` alone then points it at its
    checkpoint's new location. A new index without ``model`` gets the default model.
    """
    from .encoder import DEFAULT_MODEL, default_pretrained, load_encoder, load_encoder_for

    if model is None and identity is not None:
        return load_encoder_for(identity, device, pretrained, precision)
    name = model or DEFAULT_MODEL
    return load_encoder(name, pretrained if pretrained is not None else default_pretrained(name), device, precision)


def open_encoder(directory: Path, model: str | None = None, pretrained: str | None = None,
                 device: str = "auto", precision: str = "auto") -> Encoder:
    """:func:`encoder_for` the index at ``directory``, which need not exist yet."""
    identity = None
    location = catalog_location(Path(directory))
    if isinstance(location, str) or location.is_file():
        try:
            with IndexStore.open(directory) as store:
                identity = store.identity
        except IndexNotFound:  # a catalog with no model recorded yet: a new index
            pass
    return encoder_for(identity, model, pretrained, device, precision)


def _require_same_kind(stored: IndexSpec, wanted: IndexSpec | None, directory: Path) -> None:
    chose_auto = "auto" in stored.params or stored.kind == "auto"
    if wanted is None or wanted.kind == stored.kind or (wanted.kind == "auto" and chose_auto):
        return
    raise CrossmodalError(f"the index at {directory} is {stored.describe()}; to change it to {wanted.kind} run "
                          f"`crossmodal reindex --index {directory} --index-type {wanted.kind}` (no re-encoding)")


def leftover_temp_files(directory: Path) -> list[Path]:
    """Temp files of vector writes whose process is gone (killed mid-write): safe to delete."""
    found = []
    for path in Path(directory).glob(".*.tmp-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            found.append(path)
        except PermissionError:  # alive, someone else's
            pass
    return sorted(found)


@contextmanager
def _folder_lock(directory: Path):
    """The folder's lock for the moment of a write (a PostgreSQL catalog's writers take turns at the files)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _acquire_lock(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IndexLocked(
            f"another crossmodal process is writing to {directory}; wait for it to finish and run again"
        ) from None
    for path in leftover_temp_files(directory):  # we are the only writer now
        path.unlink(missing_ok=True)
    return fd
