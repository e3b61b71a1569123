"""The catalog: every SQL statement of the project lives here and in the modules beside it.

The catalog is the source of truth of an index. It holds the model identity and index spec, one
row per image, caption and text (FAISS ids are these rows' primary keys), and every item's full
vector, so FAISS files can always be rebuilt or re-synced from it after a crash or a change of
index kind. It is a SQLite file in the index folder, or a PostgreSQL database for large corpora
and many writers (:mod:`indexer.dialects`); the schema is :mod:`indexer.schema`, the same on both.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import bindparam, delete, event, exc, func, insert, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from .dialects import dialect_for
from .errors import CatalogDamaged, CatalogError, SchemaError
from .photometa import META_VERSION, PhotoMeta
from .schema import (
    SCHEMA_VERSION,
    STEPS,
    Base,
    EvalRunRow,
    IndexMetaRow,
    ItemRow,
    RootRow,
    SchemaVersion,
    VectorRow,
    apply_step,
    table_columns,
)

__all__ = ["SCHEMA_VERSION", "Base", "Catalog", "table_columns"]

IMAGE, CAPTION, TEXT = "image", "caption", "text"
TEXT_KINDS = (CAPTION, TEXT)
MODALITY_KINDS = {"image": (IMAGE,), "text": TEXT_KINDS}


@dataclass(frozen=True)
class EvalRun:
    id: int
    created_at: str
    model: str
    index_spec: str
    source: str
    result: dict


@dataclass(frozen=True)
class IndexMeta:
    model_name: str
    pretrained: str
    checkpoint_sha256: str | None
    checkpoint_path: str | None
    embed_dim: int
    open_clip_version: str
    index_spec: str  # JSON, owned by indexer.vectors.IndexSpec
    created_at: str


@dataclass(frozen=True)
class ImageState:
    """What the catalog knows of an image file, enough to decide whether to re-encode it."""

    id: int
    rel: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    error: str | None
    skip_info: str | None = None
    meta_version: int | None = None  # below photometa.META_VERSION (or None): its metadata is to be read


@dataclass(frozen=True)
class TextState:
    id: int
    origin: str | None
    image_id: int | None
    text: str
    sha256: str | None = None


@dataclass
class ImageWrite:
    """An image row to insert (``id`` None) or overwrite, with its vector or its error."""

    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    width: int | None = None
    height: int | None = None
    vector: np.ndarray | None = None
    error: str | None = None
    id: int | None = None
    precision: str | None = None  # the vector's (indexer.encoder.PRECISIONS); None: not known
    skip_info: str | None = None  # JSON, with ``error``: what the skip depended on
    warnings: str | None = None
    meta: PhotoMeta | None = None  # the header's metadata (None: not read, e.g. a failed decode)


@dataclass
class TextWrite:
    kind: str
    text: str
    sha256: str
    origin: str
    line: int
    image_id: int | None
    vector: np.ndarray
    precision: str | None = None


@dataclass(frozen=True)
class ItemView:
    """An item as search results and ``info`` show it; ``path`` is absolute (the image's, for captions)."""

    id: int
    kind: str
    path: str | None
    text: str | None
    image_id: int | None
    origin: str | None
    width: int | None
    height: int | None
    error: str | None
    warnings: str | None = None
    root: str | None = None  # the indexed folder ``path`` is under (None for an image named by URL)
    size: int | None = None  # bytes and mtime of an image's file when it was indexed
    mtime_ns: int | None = None
    format: str | None = None  # an image's header metadata (indexer.photometa.PhotoMeta)
    taken_at: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    orientation: int | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None


def _meta_values(meta: PhotoMeta | None) -> dict:
    """The items columns of ``meta``; None clears them and marks them never read."""
    return {**asdict(meta or PhotoMeta()), "meta_version": None if meta is None else META_VERSION}  # fields = columns


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _chunks(values: Sequence, size: int = 900) -> Iterator[Sequence]:
    # SQLite limits bound parameters per statement; stay well under the historic 999.
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Catalog:
    """A SQLite file (a path) or a PostgreSQL database (a ``postgresql://`` URL). Each public method is one
    transaction."""

    def __init__(self, location: Path | str, read_only: bool = False):
        """``read_only`` opens the catalog so that nothing can write it (a server): the schema must be current."""
        self.dialect = dialect_for(location, read_only)
        self.location = location  # to open it again elsewhere (a Ray task)
        self.where = self.dialect.where  # for messages (a URL without its password)
        self.read_only = read_only
        self.engine: Engine = self.dialect.make_engine()
        event.listen(self.engine, "handle_error", self._translate_error)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.engine.dispose()
        self.dialect.close()

    def change_counter(self) -> int:
        """A number that changes whenever another connection commits a change (searchers reload then)."""
        return self.dialect.change_counter(self.engine)

    def lock(self, name: str, shared: bool = False, wait: bool = False):
        """A named lock among the processes that write this catalog, or None where the index folder's own
        lock serialises them (SQLite). IndexLocked if it is taken and not ``wait``."""
        return self.dialect.lock(self.engine, name, shared, wait)

    def _translate_error(self, context) -> None:
        """Every statement's error passes here (connecting too): the database's trouble becomes one typed,
        one-line error; a bug in our SQL keeps its traceback."""
        original = context.original_exception
        if self.dialect.is_damage(original):
            raise CatalogDamaged(self.where, [str(original)]) from None
        read_only = getattr(original, "sqlstate", None) == "25006"  # PostgreSQL: a write in a read-only session
        if read_only or isinstance(context.sqlalchemy_exception, exc.OperationalError):  # disk full, server gone
            said = str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
            raise CatalogError(f"the catalog {self.where} could not be read or written: {said}; what was committed "
                               "before is kept. Fix that (free space, a writable index folder, a reachable "
                               "server), then run the same command again") from None

    def quick_check(self, limit: int = 5) -> list[str]:
        """The first ``limit`` problems the database finds in its own files (every page and row); [] if none."""
        return self.dialect.quick_check(self.engine, limit)

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Bring the schema up to date; older catalogs are upgraded in place, newer ones refused."""
        current = self._version()  # read first: a searcher opening an up-to-date index must not need to write
        if current == SCHEMA_VERSION:
            return
        self._refuse(current)
        with self.engine.connect() as conn:
            self.dialect.begin_migration(conn)  # one process migrates, the others wait and find it done
            SchemaVersion.__table__.create(conn, checkfirst=True)
            current = conn.scalar(select(func.max(SchemaVersion.version))) or 0
            self._refuse(current)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                step = STEPS[version - 1]
                apply_step(conn, step)
                self.dialect.after_step(conn, step.name)
                conn.execute(insert(SchemaVersion).values(version=version, applied_at=utc_now()))
            conn.commit()

    def _version(self) -> int:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("schema_version"):
                return 0
            return conn.scalar(select(func.max(SchemaVersion.version))) or 0

    def _refuse(self, current: int) -> None:
        if self.read_only and current < SCHEMA_VERSION:
            raise SchemaError(f"{self.where} has schema version {current}, older than this crossmodal's "
                              f"({SCHEMA_VERSION}); run `crossmodal verify` once to upgrade it in place")
        if current > SCHEMA_VERSION:
            raise SchemaError(f"{self.where} has schema version {current}, newer than this crossmodal understands "
                              f"({SCHEMA_VERSION}); upgrade crossmodal-search")

    def schema_version(self) -> int:
        return self._version()

    # -- meta ---------------------------------------------------------------------------------
    def meta(self) -> IndexMeta | None:
        with Session(self.engine) as s:
            row = s.get(IndexMetaRow, 1)
            if row is None:
                return None
            return IndexMeta(row.model_name, row.pretrained, row.checkpoint_sha256, row.checkpoint_path,
                             row.embed_dim, row.open_clip_version, row.index_spec, row.created_at)

    def clear_meta(self) -> None:
        """Forget the model and index type of an index that holds nothing yet (a refused first run)."""
        with Session(self.engine) as s, s.begin():
            s.execute(delete(IndexMetaRow))

    def set_meta(self, meta: IndexMeta) -> None:
        with Session(self.engine) as s, s.begin():
            s.merge(IndexMetaRow(id=1, **meta.__dict__))

    # -- roots --------------------------------------------------------------------------------
    def root_id(self, root: Path) -> int:
        key = str(root)
        found = self._root(key)
        if found is not None:
            return found
        try:
            with Session(self.engine) as s, s.begin():
                return s.scalar(insert(RootRow).values(path=key).returning(RootRow.id))
        except exc.IntegrityError:  # another writer added it meanwhile (PostgreSQL): theirs is ours
            return self._root(key)

    def _root(self, key: str) -> int | None:
        with Session(self.engine) as s:
            return s.scalar(select(RootRow.id).where(RootRow.path == key))

    def mark_root_indexed(self, root_id: int) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(RootRow).where(RootRow.id == root_id).values(indexed_at=utc_now()))

    def roots(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(select(RootRow.path).order_by(RootRow.id)))

    # -- images -------------------------------------------------------------------------------
    def image_states(self, root_id: int) -> dict[str, ImageState]:
        q = select(ItemRow.id, ItemRow.path, ItemRow.size, ItemRow.mtime_ns, ItemRow.sha256, ItemRow.error,
                   ItemRow.skip_info, ItemRow.meta_version).where(
            ItemRow.kind == IMAGE, ItemRow.root_id == root_id
        )
        with Session(self.engine) as s:
            return {row.path: ImageState(*row) for row in s.execute(q)}

    def write_images(self, root_id: int, writes: Sequence[ImageWrite]) -> list[int]:
        """Insert or overwrite image rows and their vectors; returns the ids in order."""
        now = utc_now()

        def values(w: ImageWrite) -> dict:
            return dict(kind=IMAGE, root_id=root_id, path=w.rel, size=w.size, mtime_ns=w.mtime_ns,
                        sha256=w.sha256, width=w.width, height=w.height, error=w.error, updated_at=now,
                        skip_info=w.skip_info, warnings=w.warnings, text=None, image_id=None, origin=None,
                        line=None, **_meta_values(w.meta))

        new = [w for w in writes if w.id is None]
        old = [w for w in writes if w.id is not None]
        with Session(self.engine) as s, s.begin():
            new_ids = self._insert_items(s, [values(w) for w in new])
            if old:
                s.execute(update(ItemRow), [{"id": w.id, **values(w)} for w in old])  # executemany by primary key
                for chunk in _chunks([w.id for w in old]):
                    s.execute(delete(VectorRow).where(VectorRow.item_id.in_(chunk)))
            ids_of = dict(zip(map(id, new), new_ids))
            ids = [ids_of[id(w)] if w.id is None else w.id for w in writes]
            self._insert_vectors(s, [(i, w) for i, w in zip(ids, writes) if w.vector is not None])
        return ids

    @staticmethod
    def _insert_items(s: Session, rows: list[dict]) -> list[int]:
        """Insert rows in as few statements as the database allows; their ids in the order given."""
        if not rows:
            return []
        statement = insert(ItemRow).returning(ItemRow.id, sort_by_parameter_order=True)
        return list(s.scalars(statement, rows))

    def vector_count(self, modality: str) -> int:
        q = (select(func.count()).select_from(VectorRow).join(ItemRow, ItemRow.id == VectorRow.item_id)
             .where(ItemRow.kind.in_(MODALITY_KINDS[modality])))
        with Session(self.engine) as s:
            return int(s.scalar(q) or 0)

    @staticmethod
    def _insert_vectors(s: Session, pairs: list[tuple[int, ImageWrite | TextWrite]]) -> None:
        if pairs:
            s.execute(insert(VectorRow), [{"item_id": int(i), "data": _blob(w.vector), "precision": w.precision}
                                          for i, w in pairs])

    def update_image_files(self, changes: Iterable[tuple[int, str, int, int]]) -> None:
        """Record a new path/size/mtime for images whose content is unchanged (touched or moved)."""
        now = utc_now()
        with Session(self.engine) as s, s.begin():
            for item_id, rel, size, mtime_ns in changes:
                s.execute(update(ItemRow).where(ItemRow.id == item_id)
                          .values(path=rel, size=size, mtime_ns=mtime_ns, updated_at=now))

    def update_image_meta(self, pairs: Iterable[tuple[int, PhotoMeta]]) -> int:
        """Record the header metadata of images already indexed (no other column changes); returns the rows
        updated. A PhotoMeta with nothing in it still marks its row read, so it is not read every run."""
        rows = [{"id": int(item_id), **_meta_values(meta)} for item_id, meta in pairs]
        if not rows:
            return 0
        with Session(self.engine) as s, s.begin():
            s.execute(update(ItemRow), rows)  # executemany, by primary key
        return len(rows)

    def delete_items(self, ids: Sequence[int]) -> list[int]:
        """Delete items, the captions linked to them, and their vectors; returns every deleted id."""
        deleted: list[int] = []
        with Session(self.engine) as s, s.begin():
            for chunk in _chunks(list(ids)):
                linked = list(s.scalars(select(ItemRow.id).where(ItemRow.image_id.in_(chunk))))
                everything = list(chunk) + linked
                s.execute(delete(VectorRow).where(VectorRow.item_id.in_(everything)))
                s.execute(delete(ItemRow).where(ItemRow.id.in_(linked)))
                s.execute(delete(ItemRow).where(ItemRow.id.in_(chunk)))
                deleted.extend(everything)
        return deleted

    def vectors_for_hashes(self, modality: str, hashes: Iterable[str]) -> dict[str, tuple[np.ndarray, str | None]]:
        """A stored vector and its precision for each content hash that has one, in ``modality`` (encode-once)."""
        found: dict[str, tuple[np.ndarray, str | None]] = {}
        with Session(self.engine) as s:
            for chunk in _chunks(list(set(hashes))):
                q = (select(ItemRow.sha256, VectorRow.data, VectorRow.precision)
                     .join(ItemRow, ItemRow.id == VectorRow.item_id)
                     .where(ItemRow.kind.in_(MODALITY_KINDS[modality]), ItemRow.sha256.in_(chunk)))
                for digest, data, precision in s.execute(q):
                    found.setdefault(digest, (np.frombuffer(data, dtype=np.float32).copy(), precision))
        return found

    # -- texts --------------------------------------------------------------------------------
    def text_states(self, root_id: int) -> list[TextState]:
        q = select(ItemRow.id, ItemRow.origin, ItemRow.image_id, ItemRow.text, ItemRow.sha256).where(
            ItemRow.kind.in_(TEXT_KINDS), ItemRow.root_id == root_id
        )
        with Session(self.engine) as s:
            return [TextState(*row) for row in s.execute(q)]

    def write_texts(self, root_id: int, writes: Sequence[TextWrite]) -> list[int]:
        now = utc_now()
        rows = [dict(kind=w.kind, root_id=root_id, text=w.text, sha256=w.sha256, origin=w.origin, line=w.line,
                     image_id=w.image_id, updated_at=now) for w in writes]
        with Session(self.engine) as s, s.begin():
            ids = self._insert_items(s, rows)
            self._insert_vectors(s, list(zip(ids, writes)))
        return ids

    # -- vectors ------------------------------------------------------------------------------
    def vector_ids(self, modality: str) -> np.ndarray:
        q = (select(VectorRow.item_id).join(ItemRow, ItemRow.id == VectorRow.item_id)
             .where(ItemRow.kind.in_(MODALITY_KINDS[modality])).order_by(VectorRow.item_id))
        with Session(self.engine) as s:
            return np.fromiter(s.scalars(q), dtype=np.int64)

    def iter_vectors(self, modality: str, dim: int, batch: int = 50_000, first: int = 0,
                     last: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The modality's (ids, vectors) with ids in ``first..last``, in id order, ``batch`` rows at a time: a
        whole catalog read in bounded memory (each batch its own short read, by key, not by offset)."""
        after = first - 1
        while True:
            q = (select(VectorRow.item_id, VectorRow.data).join(ItemRow, ItemRow.id == VectorRow.item_id)
                 .where(ItemRow.kind.in_(MODALITY_KINDS[modality]), VectorRow.item_id > after)
                 .order_by(VectorRow.item_id).limit(batch))
            if last is not None:
                q = q.where(VectorRow.item_id <= last)
            with Session(self.engine) as s:
                rows = s.execute(q).all()
            if not rows:
                return
            ids = np.fromiter((item_id for item_id, _ in rows), dtype=np.int64, count=len(rows))
            bad = next((item_id for item_id, blob in rows if len(blob) != dim * 4), None)
            if bad is not None:
                raise CatalogDamaged(self.where, [f"the vector of item {bad} does not have {dim * 4} bytes"])
            yield ids, np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)
            after = int(ids[-1])

    def content_hashes(self, ids: Sequence[int]) -> dict[int, str]:
        """The sha256 of each item's content (an image's file bytes) where it is known."""
        found: dict[int, str] = {}
        with Session(self.engine) as s:
            for chunk in _chunks([int(i) for i in ids]):
                q = select(ItemRow.id, ItemRow.sha256).where(ItemRow.id.in_(chunk), ItemRow.sha256.is_not(None))
                found.update((int(i), digest) for i, digest in s.execute(q))
        return found

    def vectors(self, ids: Sequence[int], dim: int, strict: bool = True) -> np.ndarray:
        """Stored vectors for ``ids``, in that order; unless ``strict``, NaN rows for ids deleted meanwhile."""
        found: dict[int, bytes] = {}
        with Session(self.engine) as s:
            for chunk in _chunks(list(ids)):
                found.update(s.execute(select(VectorRow.item_id, VectorRow.data)
                                       .where(VectorRow.item_id.in_(chunk))).all())
        out = np.empty((len(ids), dim), dtype=np.float32)
        for row, item_id in enumerate(ids):
            blob = found.get(int(item_id)) if not strict else found[int(item_id)]
            if blob is not None and len(blob) != dim * 4:  # a row SQLite read back but damage changed
                raise CatalogDamaged(self.where, [f"the vector of item {item_id} has {len(blob)} bytes, not {dim * 4}"])
            out[row] = np.nan if blob is None else np.frombuffer(blob, dtype=np.float32)
        return out

    # -- reading ------------------------------------------------------------------------------
    def items(self, ids: Sequence[int]) -> dict[int, ItemView]:
        """Look up items for display; unknown ids (e.g. deleted since the FAISS file was written) are absent."""
        views: dict[int, ItemView] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in ids]):
                for r in conn.execute(_items_query(), {"ids": list(chunk)}).all():
                    (item_id, kind, root, rel, img_root, img_rel, txt, image_id, origin, w, h, err, warn, size, mtime,
                     *photo) = r
                    path = folder = None
                    if rel is not None and root is not None:
                        path, folder = _absolute(root, rel), root
                    elif img_rel is not None and img_root is not None:
                        path, folder = _absolute(img_root, img_rel), img_root
                    if path is not None and "://" in path:
                        folder = None
                    views[item_id] = ItemView(item_id, kind, path, txt, image_id, origin, w, h, err, warn, folder,
                                              size, mtime, *photo)
        return views

    def captions_of(self, image_ids: Sequence[int]) -> dict[int, list[tuple[int, str]]]:
        """(id, text) of each image's captions, in the order they were indexed; images without any are absent."""
        found: dict[int, list[tuple[int, str]]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in image_ids]):
                for image_id, item_id, kind, txt in conn.execute(_captions_query(), {"ids": list(chunk)}).all():
                    if kind == CAPTION:
                        found.setdefault(image_id, []).append((item_id, txt))
        return found

    def counts(self) -> dict[str, int]:
        q = select(ItemRow.kind, func.count()).group_by(ItemRow.kind)
        with Session(self.engine) as s:
            counts = {IMAGE: 0, CAPTION: 0, TEXT: 0, **dict(s.execute(q).all())}
            counts["skipped"] = s.scalar(select(func.count()).where(ItemRow.error.is_not(None))) or 0
            counts["vectors"] = s.scalar(select(func.count()).select_from(VectorRow)) or 0
        return counts

    def precisions(self) -> dict[str, int]:
        """How many vectors were made in each precision (``unrecorded``: before precisions were recorded)."""
        q = select(VectorRow.precision, func.count()).group_by(VectorRow.precision)
        with Session(self.engine) as s:
            return {precision or "unrecorded": n for precision, n in s.execute(q).all()}

    # -- evaluation runs ------------------------------------------------------------------------
    def add_eval_run(self, model: str, index_spec: str, source: str, result: dict) -> int:
        row = EvalRunRow(created_at=utc_now(), model=model, index_spec=index_spec, source=source,
                         result=json.dumps(result))
        with Session(self.engine) as s, s.begin():
            s.add(row)
            s.flush()
            return row.id

    def eval_runs(self) -> list[EvalRun]:
        with Session(self.engine) as s:
            rows = s.scalars(select(EvalRunRow).order_by(EvalRunRow.id)).all()
            return [EvalRun(r.id, r.created_at, r.model, r.index_spec, r.source, json.loads(r.result)) for r in rows]

    def images(self) -> list[ItemView]:
        """Every image item, indexed or skipped, with its absolute path."""
        with Session(self.engine) as s:
            ids = list(s.scalars(select(ItemRow.id).where(ItemRow.kind == IMAGE).order_by(ItemRow.id)))
        views = self.items(ids)
        return [views[i] for i in ids]

    def skipped(self) -> list[ItemView]:
        with Session(self.engine) as s:
            ids = list(s.scalars(select(ItemRow.id).where(ItemRow.error.is_not(None)).order_by(ItemRow.id)))
        views = self.items(ids)
        return [views[i] for i in ids]


@functools.cache
def _items_query():
    # Built once: composing a select of aliased ORM columns costs more than running it (searches call this).
    image = aliased(ItemRow)
    own_root, image_root = aliased(RootRow), aliased(RootRow)
    return (
        select(ItemRow.id, ItemRow.kind, own_root.path, ItemRow.path, image_root.path, image.path,
               ItemRow.text, ItemRow.image_id, ItemRow.origin, ItemRow.width, ItemRow.height, ItemRow.error,
               ItemRow.warnings, ItemRow.size, ItemRow.mtime_ns, ItemRow.format, ItemRow.taken_at,
               ItemRow.camera_make, ItemRow.camera_model, ItemRow.orientation, ItemRow.gps_lat, ItemRow.gps_lon)
        .outerjoin(own_root, own_root.id == ItemRow.root_id)
        .outerjoin(image, image.id == ItemRow.image_id)
        .outerjoin(image_root, image_root.id == image.root_id)
        .where(ItemRow.id.in_(bindparam("ids", expanding=True)))
    )


@functools.cache
def _captions_query():
    # Filtered on image_id alone: with kind in the WHERE too, SQLite (without ANALYZE statistics) walks
    # the (kind, sha256) index over every caption instead of looking up the few images asked for.
    return (select(ItemRow.image_id, ItemRow.id, ItemRow.kind, ItemRow.text)
            .where(ItemRow.image_id.in_(bindparam("ids", expanding=True)))
            .order_by(ItemRow.id))


def _absolute(root: str, rel: str) -> str:
    # Imported embeddings may name their images by URL (or absolute path, which join keeps as is).
    # os.path, not pathlib: searches build one per hit, and Path() was half of looking items up.
    return rel if "://" in rel else os.path.join(root, rel)
