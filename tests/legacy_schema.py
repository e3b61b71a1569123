"""The SQLite DDL of schema versions 1-5 as released (raw SQL, before the schema was defined once in
indexer/schema.py): the tests build catalogs written by those releases from it, and upgrade them."""

# Frozen: never edit.
LEGACY_SQLITE: tuple[str, ...] = (
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
