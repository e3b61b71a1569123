"""The catalog's schema, defined once (SQLAlchemy models), and the named steps that migrate a database to it.

The same models create a new catalog on SQLite and on PostgreSQL. A catalog written by an older
release is brought up to date by the :data:`STEPS` it has not recorded in ``schema_version`` yet.
Steps are append-only (never edit a released one, add another) and idempotent: each creates the
tables, columns and indexes it names only where they are missing, so a new catalog, which gets
every table at once from step 1, passes through the later ones unchanged, and a step cut short is
finished by the next run. Each dialect adds what it does differently (keyword search, change
counting) in its own hook (:mod:`indexer.dialects`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Text,
    inspect,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex

# SQLite makes only "INTEGER PRIMARY KEY" the rowid (ids never reused with AUTOINCREMENT); elsewhere
# ids are 64-bit, as FAISS's are.
ID = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {str: Text, int: BigInteger, float: Float, bytes: LargeBinary}


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[str]


class IndexMetaRow(Base):
    __tablename__ = "index_meta"
    __table_args__ = (CheckConstraint("id = 1", name="one_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    model_name: Mapped[str]
    pretrained: Mapped[str]
    checkpoint_sha256: Mapped[str | None]
    checkpoint_path: Mapped[str | None]
    embed_dim: Mapped[int] = mapped_column(Integer)
    open_clip_version: Mapped[str]
    index_spec: Mapped[str]
    created_at: Mapped[str]


class RootRow(Base):
    __tablename__ = "roots"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(ID, primary_key=True)
    path: Mapped[str] = mapped_column(unique=True)
    indexed_at: Mapped[str | None]


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint("kind IN ('image', 'caption', 'text')", name="item_kind"),
        Index("ix_items_image_path", "root_id", "path", unique=True, sqlite_where=text("kind = 'image'"),
              postgresql_where=text("kind = 'image'")),
        Index("ix_items_sha256", "kind", "sha256"),
        Index("ix_items_image_id", "image_id"),
        Index("ix_items_origin", "root_id", "origin"),
        Index("ix_items_taken_at", "taken_at"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(ID, primary_key=True)
    kind: Mapped[str]
    root_id: Mapped[int | None] = mapped_column(ID, ForeignKey("roots.id", ondelete="CASCADE"))
    path: Mapped[str | None]
    size: Mapped[int | None]
    mtime_ns: Mapped[int | None]
    sha256: Mapped[str | None]
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None]
    image_id: Mapped[int | None] = mapped_column(ID, ForeignKey("items.id", ondelete="CASCADE"))
    origin: Mapped[str | None]
    line: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None]
    updated_at: Mapped[str]
    skip_info: Mapped[str | None]  # JSON: the settings and versions a skip depended on
    warnings: Mapped[str | None]  # what the image libraries said while decoding, one per line
    format: Mapped[str | None]  # the rest: indexer.photometa.PhotoMeta's fields, as read from the header
    taken_at: Mapped[str | None]  # ISO 'YYYY-MM-DDTHH:MM:SS', the camera's local time
    camera_make: Mapped[str | None]
    camera_model: Mapped[str | None]
    orientation: Mapped[int | None] = mapped_column(Integer)
    gps_lat: Mapped[float | None]
    gps_lon: Mapped[float | None]
    meta_version: Mapped[int | None] = mapped_column(Integer)  # photometa.META_VERSION that read them; NULL: never


class VectorRow(Base):
    __tablename__ = "vectors"
    item_id: Mapped[int] = mapped_column(ID, ForeignKey("items.id", ondelete="CASCADE"), primary_key=True,
                                         autoincrement=False)
    data: Mapped[bytes]
    precision: Mapped[str | None]  # fp32 or bf16, what the model ran in (indexer.encoder); NULL: not recorded


class EvalRunRow(Base):
    __tablename__ = "eval_runs"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(ID, primary_key=True)
    created_at: Mapped[str]
    model: Mapped[str]
    index_spec: Mapped[str]
    source: Mapped[str]
    result: Mapped[str]  # the evaluation as JSON


@dataclass(frozen=True)
class Step:
    """What one schema version brings: tables, columns (``table.column``) and indexes, each created only
    if missing, then the dialect's own hook for this step's name."""

    name: str
    tables: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()


# Append-only: step i brings the schema to version i+1.
STEPS: tuple[Step, ...] = (
    Step("initial", tables=("index_meta", "roots", "items", "vectors"),
         indexes=("ix_items_image_path", "ix_items_sha256", "ix_items_image_id", "ix_items_origin")),
    Step("eval_runs", tables=("eval_runs",)),  # crossmodal eval --save-run / --history
    Step("skip_info", columns=("items.skip_info", "items.warnings")),  # what a skip depended on; decode warnings
    Step("keywords"),  # keyword search: the dialect's full-text index over captions, texts and paths
    Step("photo_meta", columns=tuple(f"items.{c}" for c in (
        "format", "taken_at", "camera_make", "camera_model", "orientation", "gps_lat", "gps_lon", "meta_version")),
         indexes=("ix_items_taken_at",)),  # photo metadata from each image's header, for filters
    Step("vector_precision", columns=("vectors.precision",)),  # the precision each vector was made in
)
SCHEMA_VERSION = len(STEPS)


def apply_step(conn: Connection, step: Step) -> None:
    """Create what ``step`` names and is not there yet (dialect hooks are the caller's)."""
    tables = Base.metadata.tables
    present = set(inspect(conn).get_table_names())
    for name in step.tables:
        if name not in present:
            tables[name].create(conn)
    for qualified in step.columns:
        table, column = qualified.split(".")
        if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
            col = tables[table].c[column]
            kind = col.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for name in step.indexes:
        index = next(ix for table in tables.values() for ix in table.indexes if ix.name == name)
        if name not in {ix["name"] for ix in inspect(conn).get_indexes(index.table.name)}:
            conn.execute(CreateIndex(index))


def table_columns(conn: Connection, table: str) -> list[str]:
    """Column names as the database has them, in order (to check the models match the migrations)."""
    return [c["name"] for c in inspect(conn).get_columns(table)]
