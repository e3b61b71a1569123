"""The SQLite catalog: every SQL statement of the project lives here.

The catalog is the source of truth of an index. It holds the model identity and index spec, one
row per image, caption and text (FAISS ids are these rows' primary keys), and every item's full
vector, so FAISS files can always be rebuilt or re-synced from it after a crash or a change of
index kind. The schema is created by append-only migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    ForeignKey,
    LargeBinary,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from .errors import CatalogDamaged, SchemaError
from .photometa import META_VERSION, PhotoMeta

IMAGE, CAPTION, TEXT = "image", "caption", "text"
TEXT_KINDS = (CAPTION, TEXT)
MODALITY_KINDS = {"image": (IMAGE,), "text": TEXT_KINDS}

# Append-only: never edit a released entry, add a new one. Index i brings the schema to version i+1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE index_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        model_name TEXT NOT NULL,
        pretrained TEXT NOT NULL,
        checkpoint_sha256 TEXT,
        checkpoint_path TEXT,
        embed_dim INTEGER NOT NULL,
        open_clip_version TEXT NOT NULL,
        index_spec TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE roots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL UNIQUE,
        indexed_at TEXT
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('image', 'caption', 'text')),
        root_id INTEGER REFERENCES roots(id) ON DELETE CASCADE,
        path TEXT,
        size INTEGER,
        mtime_ns INTEGER,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        text TEXT,
        image_id INTEGER REFERENCES items(id) ON DELETE CASCADE,
        origin TEXT,
        line INTEGER,
        error TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX ix_items_image_path ON items (root_id, path) WHERE kind = 'image';
    CREATE INDEX ix_items_sha256 ON items (kind, sha256);
    CREATE INDEX ix_items_image_id ON items (image_id);
    CREATE INDEX ix_items_origin ON items (root_id, origin);
    CREATE TABLE vectors (
        item_id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        data BLOB NOT NULL
    );
    """,
    # v2: saved evaluation runs (crossmodal eval --save-run / --history)
    """
    CREATE TABLE eval_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL,
        model TEXT NOT NULL,
        index_spec TEXT NOT NULL,
        source TEXT NOT NULL,
        result TEXT NOT NULL
    );
    """,
    # v3: what a skip depended on (retried when that changes) and library warnings per file
    """
    ALTER TABLE items ADD COLUMN skip_info TEXT;
    ALTER TABLE items ADD COLUMN warnings TEXT;
    """,
    # v4: keyword search (FTS5): the words of each caption and text, and of each image's path under
    # its root (file and folder names); kept in step with items by triggers. rowid = items.id.
    """
    CREATE VIRTUAL TABLE item_words USING fts5(words, tokenize = 'unicode61 remove_diacritics 2');
    INSERT INTO item_words (rowid, words)
        SELECT id, CASE WHEN kind = 'image' THEN path ELSE text END FROM items WHERE error IS NULL;
    CREATE TRIGGER item_words_insert AFTER INSERT ON items WHEN new.error IS NULL BEGIN
        INSERT INTO item_words (rowid, words) VALUES (new.id, CASE WHEN new.kind = 'image' THEN new.path
                                                                   ELSE new.text END);
    END;
    CREATE TRIGGER item_words_delete AFTER DELETE ON items BEGIN
        DELETE FROM item_words WHERE rowid = old.id;
    END;
    CREATE TRIGGER item_words_update AFTER UPDATE OF path, text, error ON items BEGIN
        DELETE FROM item_words WHERE rowid = old.id;
        INSERT INTO item_words (rowid, words) SELECT new.id, CASE WHEN new.kind = 'image' THEN new.path
                                                                  ELSE new.text END WHERE new.error IS NULL;
    END;
    """,
    # v5: photo metadata from each image's header (indexer.photometa), for filters; meta_version NULL:
    # never read (rows indexed before v5 are read by the next index run without being encoded again).
    """
    ALTER TABLE items ADD COLUMN format TEXT;
    ALTER TABLE items ADD COLUMN taken_at TEXT;
    ALTER TABLE items ADD COLUMN camera_make TEXT;
    ALTER TABLE items ADD COLUMN camera_model TEXT;
    ALTER TABLE items ADD COLUMN orientation INTEGER;
    ALTER TABLE items ADD COLUMN gps_lat REAL;
    ALTER TABLE items ADD COLUMN gps_lon REAL;
    ALTER TABLE items ADD COLUMN meta_version INTEGER;
    CREATE INDEX ix_items_taken_at ON items (taken_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# SQLite's primary result codes for a file that is not (or no longer) a sound database.
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
# Python before 3.11 gives no result code, only the message; a text column that is not UTF-8 can only
# come from damage, since the catalog stores undecodable file names escaped.
DAMAGE_MESSAGES = ("file is not a database", "database disk image is malformed", "could not decode to utf-8")


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(primary_key=True)
    applied_at: Mapped[str]


class IndexMetaRow(Base):
    __tablename__ = "index_meta"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str]
    pretrained: Mapped[str]
    checkpoint_sha256: Mapped[str | None]
    checkpoint_path: Mapped[str | None]
    embed_dim: Mapped[int]
    open_clip_version: Mapped[str]
    index_spec: Mapped[str]
    created_at: Mapped[str]


class RootRow(Base):
    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str]
    indexed_at: Mapped[str | None]


class ItemRow(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    root_id: Mapped[int | None] = mapped_column(ForeignKey("roots.id"))
    path: Mapped[str | None]
    size: Mapped[int | None]
    mtime_ns: Mapped[int | None]
    sha256: Mapped[str | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    text: Mapped[str | None]
    image_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"))
    origin: Mapped[str | None]
    line: Mapped[int | None]
    error: Mapped[str | None]
    updated_at: Mapped[str]
    skip_info: Mapped[str | None]  # JSON: the settings and versions a skip depended on
    warnings: Mapped[str | None]  # what the image libraries said while decoding, one per line
    format: Mapped[str | None]  # the rest: indexer.photometa.PhotoMeta's fields, as read from the header
    taken_at: Mapped[str | None]  # ISO 'YYYY-MM-DDTHH:MM:SS', the camera's local time
    camera_make: Mapped[str | None]
    camera_model: Mapped[str | None]
    orientation: Mapped[int | None]
    gps_lat: Mapped[float | None]
    gps_lon: Mapped[float | None]
    meta_version: Mapped[int | None]  # photometa.META_VERSION that read them; NULL: never read


class VectorRow(Base):
    __tablename__ = "vectors"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class EvalRunRow(Base):
    __tablename__ = "eval_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[str]
    model: Mapped[str]
    index_spec: Mapped[str]
    source: Mapped[str]
    result: Mapped[str]  # the evaluation as JSON


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
    """One SQLite file. Each public method is one transaction."""

    def __init__(self, path: Path, read_only: bool = False):
        """``read_only`` opens the file so that nothing can write it (a server): the schema must be current."""
        self.path = Path(path)
        self.read_only = read_only
        url = f"sqlite:///{_read_only_uri(self.path)}&uri=true" if read_only else f"sqlite:///{self.path}"
        self.engine: Engine = create_engine(url, future=True)
        event.listen(self.engine, "connect", _configure_read_only if read_only else _configure_connection)
        event.listen(self.engine, "handle_error", self._raise_if_damaged)
        self._watch: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()
        self._migrate()

    def close(self) -> None:
        self.engine.dispose()
        if self._watch is not None:
            self._watch.close()

    def change_counter(self) -> int:
        """A number that changes whenever another connection commits (SQLite's ``PRAGMA data_version``).

        It is kept per connection, so one connection is held open for it alone.
        """
        with self._watch_lock:
            if self._watch is None:
                self._watch = sqlite3.connect(_read_only_uri(self.path), uri=True, check_same_thread=False)
            return self._watch.execute("PRAGMA data_version").fetchone()[0]

    def _raise_if_damaged(self, context) -> None:
        """Every statement's error passes here (connecting too): damage becomes one typed error."""
        if is_damage(context.original_exception):
            raise CatalogDamaged(self.path, [str(context.original_exception)]) from None

    def quick_check(self, limit: int = 5) -> list[str]:
        """The first ``limit`` problems SQLite's ``PRAGMA quick_check`` finds (every page and row); [] if none."""
        try:
            return self._quick_check(str(int(limit)))[:limit]
        except CatalogDamaged as whole:
            # SQLite gives up, listing nothing, at a table it cannot scan: check table by table to say which.
            return (self._quick_check_tables() or whole.problems)[:limit]

    def _quick_check_tables(self) -> list[str]:
        try:
            with self.engine.connect() as conn:
                tables = list(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
        except CatalogDamaged:
            return []
        problems = []
        for table in tables:
            try:
                lines = self._quick_check("'" + table.replace("'", "''") + "'")
            except CatalogDamaged as exc:
                lines = exc.problems
            problems += [f"table {table}: {line}" for line in lines]
        return problems

    def _quick_check(self, argument: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = [str(row[0]) for row in conn.exec_driver_sql(f"PRAGMA quick_check({argument})")]
        lines = [line.strip() for row in rows for line in row.splitlines()]
        lines = [line for line in lines if line and line != "*** in database main ***"]
        return [] if lines == ["ok"] else lines

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Bring the schema up to date; older index files are upgraded in place, newer ones refused."""
        with self.engine.connect() as conn:
            # Read first: a searcher opening an up-to-date index must not need to write to it.
            exists = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").first()
            current = (conn.execute(select(func.max(SchemaVersion.version))).scalar() or 0) if exists else 0
        if current == SCHEMA_VERSION:
            return
        if self.read_only and current < SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has schema version {current}, older than this crossmodal's "
                              f"({SCHEMA_VERSION}); run `crossmodal verify` once to upgrade it in place")
        if current > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has schema version {current}, newer than this crossmodal understands "
                f"({SCHEMA_VERSION}); upgrade crossmodal-search"
            )
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            raw = self.engine.raw_connection()
            try:
                # executescript commits on its own; wrap it so a version is recorded with its DDL.
                record = f"INSERT INTO schema_version VALUES ({version}, '{utc_now()}')"
                script = f"BEGIN; {MIGRATIONS[version - 1]}; {record}; COMMIT;"
                raw.driver_connection.executescript(script)
            except sqlite3.DatabaseError as exc:  # the raw connection bypasses handle_error
                if is_damage(exc):
                    raise CatalogDamaged(self.path, [str(exc)]) from None
                raise
            finally:
                raw.close()

    def schema_version(self) -> int:
        with Session(self.engine) as s:
            return s.scalar(select(func.max(SchemaVersion.version))) or 0

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
        with Session(self.engine) as s, s.begin():
            found = s.scalar(select(RootRow.id).where(RootRow.path == key))
            if found is not None:
                return found
            return s.scalar(insert(RootRow).values(path=key).returning(RootRow.id))

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
        ids: list[int] = []
        now = utc_now()
        with Session(self.engine) as s, s.begin():
            for w in writes:
                values = dict(kind=IMAGE, root_id=root_id, path=w.rel, size=w.size, mtime_ns=w.mtime_ns,
                              sha256=w.sha256, width=w.width, height=w.height, error=w.error, updated_at=now,
                              skip_info=w.skip_info, warnings=w.warnings, **_meta_values(w.meta))
                if w.id is None:
                    item_id = s.scalar(insert(ItemRow).values(**values).returning(ItemRow.id))
                else:
                    item_id = w.id
                    s.execute(update(ItemRow).where(ItemRow.id == item_id).values(**values))
                    s.execute(delete(VectorRow).where(VectorRow.item_id == item_id))
                if w.vector is not None:
                    s.execute(insert(VectorRow).values(item_id=item_id, data=_blob(w.vector)))
                ids.append(item_id)
        return ids

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

    def vectors_for_hashes(self, modality: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """A stored vector for each content hash that has one, in ``modality`` (for encode-once)."""
        found: dict[str, np.ndarray] = {}
        with Session(self.engine) as s:
            for chunk in _chunks(list(set(hashes))):
                q = (select(ItemRow.sha256, VectorRow.data).join(ItemRow, ItemRow.id == VectorRow.item_id)
                     .where(ItemRow.kind.in_(MODALITY_KINDS[modality]), ItemRow.sha256.in_(chunk)))
                for digest, data in s.execute(q):
                    found.setdefault(digest, np.frombuffer(data, dtype=np.float32).copy())
        return found

    # -- texts --------------------------------------------------------------------------------
    def text_states(self, root_id: int) -> list[TextState]:
        q = select(ItemRow.id, ItemRow.origin, ItemRow.image_id, ItemRow.text, ItemRow.sha256).where(
            ItemRow.kind.in_(TEXT_KINDS), ItemRow.root_id == root_id
        )
        with Session(self.engine) as s:
            return [TextState(*row) for row in s.execute(q)]

    def write_texts(self, root_id: int, writes: Sequence[TextWrite]) -> list[int]:
        ids = []
        now = utc_now()
        with Session(self.engine) as s, s.begin():
            for w in writes:
                item_id = s.scalar(insert(ItemRow).values(
                    kind=w.kind, root_id=root_id, text=w.text, sha256=w.sha256, origin=w.origin, line=w.line,
                    image_id=w.image_id, updated_at=now).returning(ItemRow.id))
                s.execute(insert(VectorRow).values(item_id=item_id, data=_blob(w.vector)))
                ids.append(item_id)
        return ids

    # -- vectors ------------------------------------------------------------------------------
    def vector_ids(self, modality: str) -> np.ndarray:
        q = (select(VectorRow.item_id).join(ItemRow, ItemRow.id == VectorRow.item_id)
             .where(ItemRow.kind.in_(MODALITY_KINDS[modality])).order_by(VectorRow.item_id))
        with Session(self.engine) as s:
            return np.fromiter(s.scalars(q), dtype=np.int64)

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
                raise CatalogDamaged(self.path, [f"the vector of item {item_id} has {len(blob)} bytes, not {dim * 4}"])
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


def is_damage(exc: BaseException) -> bool:
    """Whether a DB-API error says the file is not a sound SQLite database (not: locked, full, read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB):  # extended codes too
        return True
    return any(message in str(exc).lower() for message in DAMAGE_MESSAGES)


def _absolute(root: str, rel: str) -> str:
    # Imported embeddings may name their images by URL (or absolute path, which join keeps as is).
    # os.path, not pathlib: searches build one per hit, and Path() was half of looking items up.
    return rel if "://" in rel else os.path.join(root, rel)


def _configure_connection(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets searches read the last committed state while an indexer writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _read_only_uri(path: Path) -> str:
    return f"file:{quote(str(path.absolute()))}?mode=ro"


def _configure_read_only(dbapi_connection, _record) -> None:
    # No journal_mode here: setting it is a write. WAL readers still see every commit (the folder must be
    # writable for SQLite's -shm file, or the index must be closed by its writers).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def table_columns(engine: Engine, table: str) -> list[str]:
    """Column names as the database has them (used to check the models match the migrations)."""
    with engine.connect() as conn:
        return [row[1] for row in conn.execute(text(f"PRAGMA table_info({table})"))]
