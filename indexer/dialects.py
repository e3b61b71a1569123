"""What the catalog does differently on SQLite and on PostgreSQL, each behind one small interface.

:class:`SQLite` is a file in the index folder (WAL, one writer, FTS5 keyword search, damage checks);
:class:`PostgreSQL` is a server that many processes write at once (advisory locks, a GIN full-text
index, a change counter kept by triggers). Everything else in the catalog is dialect-neutral SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url

from .errors import CatalogDamaged, CatalogError, IndexLocked
from .location import require_postgres_url

# SQLite's primary result codes for a file that is not (or no longer) a sound database.
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
# Python before 3.11 gives no result code, only the message; a text column that is not UTF-8 can only
# come from damage, since the catalog stores undecodable file names escaped.
DAMAGE_MESSAGES = ("file is not a database", "database disk image is malformed", "could not decode to utf-8")


def is_damage(exc: BaseException) -> bool:
    """Whether a DB-API error says the file is not a sound SQLite database (not: locked, full, read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB):  # extended codes too
        return True
    return any(message in str(exc).lower() for message in DAMAGE_MESSAGES)


def postgres_url(url: str) -> str:
    """``url`` with psycopg 3 as its driver; refuses anything but a PostgreSQL URL."""
    return "postgresql+psycopg://" + require_postgres_url(url).split("://", 1)[1]


BUSY_TIMEOUT_S = 30  # how long a statement waits for another connection's lock before it fails


def _set_wal(cursor) -> None:
    """``PRAGMA journal_mode=WAL``, waiting as a busy timeout would: while other connections open the same
    new file SQLite can refuse the switch with "database is locked" at once, its busy handler not asked
    (four threads opening one new catalog did, about one run in a hundred)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLite:
    """``catalog.sqlite`` in the index folder: one writer at a time (the folder's lock), readers beside it."""

    name = "sqlite"
    keyword_step = """
    CREATE VIRTUAL TABLE IF NOT EXISTS item_words USING fts5(words, tokenize = 'unicode61 remove_diacritics 2');
    DELETE FROM item_words;
    INSERT INTO item_words (rowid, words)
        SELECT id, CASE WHEN kind = 'image' THEN path ELSE text END FROM items WHERE error IS NULL;
    DROP TRIGGER IF EXISTS item_words_insert;
    CREATE TRIGGER item_words_insert AFTER INSERT ON items WHEN new.error IS NULL BEGIN
        INSERT INTO item_words (rowid, words) VALUES (new.id, CASE WHEN new.kind = 'image' THEN new.path
                                                                   ELSE new.text END);
    END;
    DROP TRIGGER IF EXISTS item_words_delete;
    CREATE TRIGGER item_words_delete AFTER DELETE ON items BEGIN
        DELETE FROM item_words WHERE rowid = old.id;
    END;
    DROP TRIGGER IF EXISTS item_words_update;
    CREATE TRIGGER item_words_update AFTER UPDATE OF path, text, error ON items BEGIN
        DELETE FROM item_words WHERE rowid = old.id;
        INSERT INTO item_words (rowid, words) SELECT new.id, CASE WHEN new.kind = 'image' THEN new.path
                                                                  ELSE new.text END WHERE new.error IS NULL;
    END;
    """

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        self.where = str(self.path)
        self.read_only = read_only
        self._watch: sqlite3.Connection | None = None
        self._watch_lock = threading.Lock()

    def make_engine(self) -> Engine:
        url = f"sqlite:///{self._read_only_uri()}&uri=true" if self.read_only else f"sqlite:///{self.path}"
        engine = create_engine(url)
        event.listen(engine, "connect", self._configure)
        return engine

    def _read_only_uri(self) -> str:
        return f"file:{quote(str(self.path.absolute()))}?mode=ro"

    def _configure(self, dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        if not self.read_only:  # setting the journal mode is a write
            # WAL lets searches read the last committed state while an indexer writes.
            _set_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    def begin_migration(self, conn: Connection) -> None:
        # pysqlite runs DDL in the open transaction; IMMEDIATE makes two first opens migrate one after the other.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    def after_step(self, conn: Connection, step: str) -> None:
        if step == "keywords":
            for statement in _statements(self.keyword_step):
                conn.exec_driver_sql(statement)

    def change_counter(self, engine: Engine) -> int:
        """SQLite's ``PRAGMA data_version``: it changes whenever another connection commits. It is kept per
        connection, so one connection is held open for it alone."""
        with self._watch_lock:
            if self._watch is None:
                self._watch = sqlite3.connect(self._read_only_uri(), uri=True, check_same_thread=False)
            return self._watch.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def is_damage(self, exc: BaseException) -> bool:
        return is_damage(exc)

    def quick_check(self, engine: Engine, limit: int) -> list[str]:
        """The first ``limit`` problems SQLite's ``PRAGMA quick_check`` finds; [] if none."""
        try:
            return _quick_check(engine, str(int(limit)))[:limit]
        except CatalogDamaged as whole:
            # SQLite gives up, listing nothing, at a table it cannot scan: check table by table to say which.
            return (_quick_check_tables(engine) or whole.problems)[:limit]

    def glob(self, expr: str, param: str) -> str:
        return f"{expr} GLOB :{param}"

    def glob_value(self, pattern: str) -> str:
        return pattern

    def contains(self, haystack: str, param: str) -> str:
        return f"instr({haystack}, :{param}) > 0"

    def fetch_ids(self, conn: Connection, sql: str, params: dict) -> np.ndarray:
        # the DB-API cursor straight into numpy: a million ids as Python rows through SQLAlchemy cost ~1 s
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(sql, params)  # sqlite3 takes the :name parameters as they are
            return np.fromiter((row[0] for row in cursor), dtype=np.int64)
        finally:
            cursor.close()

    def lock(self, engine: Engine, name: str, shared: bool = False, wait: bool = False) -> None:
        return None  # the index folder's file lock serialises writers (indexer.store)


class PostgreSQL:
    """A PostgreSQL database (psycopg 3) that several index processes write at the same time."""

    name = "postgresql"
    # Paths split at punctuation as FTS5's unicode61 does, so IMG_1234.jpg is the words img, 1234, jpg.
    WORDS = ("to_tsvector('simple', regexp_replace(CASE WHEN {t}kind = 'image' THEN {t}path ELSE {t}text END, "
             "'[^[:alnum:]]+', ' ', 'g'))")
    change_step = """
    CREATE TABLE IF NOT EXISTS catalog_changes (id INTEGER PRIMARY KEY CHECK (id = 1), n BIGINT NOT NULL);
    INSERT INTO catalog_changes VALUES (1, 0) ON CONFLICT DO NOTHING;
    CREATE OR REPLACE FUNCTION catalog_changed() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN UPDATE catalog_changes SET n = n + 1 WHERE id = 1; RETURN NULL; END $$;
    """

    def __init__(self, url: str, read_only: bool = False):
        self.url = make_url(postgres_url(url))
        self.where = self.url.render_as_string(hide_password=True)
        self.read_only = read_only

    def make_engine(self) -> Engine:
        options = "-c default_transaction_read_only=on" if self.read_only else ""
        try:
            return create_engine(self.url, pool_pre_ping=True,
                                 connect_args={"connect_timeout": 10, "options": options})
        except ImportError as exc:
            raise CatalogError(f"a PostgreSQL catalog needs psycopg 3: pip install 'crossmodal-search[postgres]' "
                               f"({exc})") from None

    def begin_migration(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key("migrate")})

    def after_step(self, conn: Connection, step: str) -> None:
        if step == "initial":
            for statement in _statements(self.change_step):
                conn.exec_driver_sql(statement)
            for table in ("index_meta", "items", "vectors"):  # every change a searcher must see
                conn.exec_driver_sql(f"CREATE OR REPLACE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE "
                                     f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed()")
        elif step == "keywords":
            conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_items_words ON items USING gin "
                                 f"(({self.WORDS.format(t='')})) WHERE error IS NULL")

    def change_counter(self, engine: Engine) -> int:
        """Bumped by a statement trigger in every transaction that changes the catalog, so it moves when
        that transaction commits (a sequence would move before, and a reader could miss the commit)."""
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT n FROM catalog_changes WHERE id = 1").scalar_one())

    def close(self) -> None:
        pass

    def is_damage(self, exc: BaseException) -> bool:
        return False  # the server keeps its own files sound, or refuses to start

    def quick_check(self, engine: Engine, limit: int) -> list[str]:
        return []  # nothing to check from here, for the same reason

    def glob(self, expr: str, param: str) -> str:
        return f"{expr} ~ :{param}"

    def glob_value(self, pattern: str) -> str:
        return glob_regex(pattern)

    def contains(self, haystack: str, param: str) -> str:
        return f"strpos({haystack}, :{param}) > 0"

    def fetch_ids(self, conn: Connection, sql: str, params: dict) -> np.ndarray:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql), params)  # psycopg's %(name)s style
            return np.fromiter((row[0] for row in cursor), dtype=np.int64)
        finally:
            cursor.close()

    def lock(self, engine: Engine, name: str, shared: bool = False, wait: bool = False) -> AdvisoryLock:
        """A session advisory lock named ``name``, held until released; IndexLocked if taken and not ``wait``."""
        return AdvisoryLock(engine, name, shared, wait, self.where)


class AdvisoryLock:
    """One connection that holds a PostgreSQL advisory lock for as long as the lock is kept."""

    def __init__(self, engine: Engine, name: str, shared: bool, wait: bool, where: str):
        self.name, self.key, self.shared = name, lock_key(name), shared
        self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        function = ("pg_advisory_lock" if wait else "pg_try_advisory_lock") + ("_shared" if shared else "")
        got = self._conn.execute(text(f"SELECT {function}(:key)"), {"key": self.key}).scalar()
        if not wait and not got:
            self._conn.close()
            raise IndexLocked(f"another crossmodal process holds {name} in the catalog {where}; wait for it to "
                              "finish and run again")

    def release(self) -> None:
        if self._conn is None:
            return
        # The connection goes back to the pool, its session alive: the lock must be let go of explicitly.
        try:
            unlock = "pg_advisory_unlock_shared" if self.shared else "pg_advisory_unlock"
            self._conn.execute(text(f"SELECT {unlock}(:key)"), {"key": self.key})
        except Exception:
            self._conn.invalidate()  # a session that cannot unlock is closed for good, and its locks with it
        finally:
            self._conn.close()
            self._conn = None


def _quick_check_tables(engine: Engine) -> list[str]:
    try:
        with engine.connect() as conn:
            tables = list(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
    except CatalogDamaged:
        return []
    problems = []
    for table in tables:
        try:
            lines = _quick_check(engine, "'" + table.replace("'", "''") + "'")
        except CatalogDamaged as exc:
            lines = exc.problems
        problems += [f"table {table}: {line}" for line in lines]
    return problems


def _quick_check(engine: Engine, argument: str) -> list[str]:
    with engine.connect() as conn:
        rows = [str(row[0]) for row in conn.exec_driver_sql(f"PRAGMA quick_check({argument})")]
    lines = [line.strip() for row in rows for line in row.splitlines()]
    lines = [line for line in lines if line and line != "*** in database main ***"]
    return [] if lines == ["ok"] else lines


def lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for a name (crossmodal's locks, apart from other applications')."""
    return int.from_bytes(hashlib.sha256(b"crossmodal:" + name.encode()).digest()[:8], "big", signed=True)


def glob_regex(pattern: str) -> str:
    """SQLite's GLOB (``*``, ``?``, ``[...]``, ``[^...]``; case-sensitive, the whole text) as a POSIX regex."""
    out, i = ["^"], 0
    while i < len(pattern):
        char = pattern[i]
        end = pattern.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif end != -1:
            body = pattern[i + 1 : end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char) if not char.isalnum() else char)
        i += 1
    return "".join(out) + "$"


def dialect_for(location: Path | str, read_only: bool = False) -> SQLite | PostgreSQL:
    """A SQLite file (a path) or a PostgreSQL database (a URL)."""
    if isinstance(location, str) and "://" in location:
        return PostgreSQL(location, read_only)
    return SQLite(Path(location), read_only)


def _statements(script: str) -> list[str]:
    """A script's statements; a trigger body's own semicolons stay with it (it ends at END;)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        inside_trigger = joined.upper().startswith("CREATE TRIGGER") and not joined.upper().endswith("END;")
        if joined.endswith(";") and not inside_trigger and joined.count("$$") % 2 == 0:
            out.append(joined)
            current = []
    if "\n".join(current).strip():
        out.append("\n".join(current).strip())
    return out
