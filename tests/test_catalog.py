import sqlite3

import numpy as np
import pytest

from indexer.catalog import (
    SCHEMA_VERSION,
    Base,
    Catalog,
    ImageWrite,
    IndexMeta,
    TextWrite,
    table_columns,
)
from indexer.errors import SchemaError

pytestmark = pytest.mark.usefixtures("either_catalog")


@pytest.fixture
def catalog(tmp_path, either_catalog):
    cat = Catalog(either_catalog or tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def unit(seed, dim=4):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.sqlite_only
def test_migrations_record_version_and_use_wal(catalog, tmp_path):
    assert catalog.schema_version() == SCHEMA_VERSION
    con = sqlite3.connect(tmp_path / "catalog.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in con.execute("SELECT version FROM schema_version")] == list(range(1, SCHEMA_VERSION + 1))


@pytest.mark.sqlite_only
def test_reopening_does_not_migrate_twice(tmp_path):
    Catalog(tmp_path / "c.sqlite").close()
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path, either_catalog):
    location = either_catalog or tmp_path / "c.sqlite"
    cat = Catalog(location)
    with cat.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO schema_version VALUES ({SCHEMA_VERSION + 1}, 'future')")
    cat.close()
    with pytest.raises(SchemaError, match="newer"):
        Catalog(location)


@pytest.mark.sqlite_only
def test_an_upgraded_release_catalog_has_the_schema_of_a_new_one(tmp_path):
    from legacy_schema import LEGACY_SQLITE
    from sqlalchemy import inspect

    con = sqlite3.connect(tmp_path / "old.sqlite")
    con.executescript("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);"
                      + LEGACY_SQLITE[0] + "; INSERT INTO schema_version VALUES (1, 'then');")
    con.close()
    old, new = Catalog(tmp_path / "old.sqlite"), Catalog(tmp_path / "new.sqlite")

    def shape(cat):
        seen = inspect(cat.engine)
        return {t: ([c["name"] for c in seen.get_columns(t)], sorted(i["name"] for i in seen.get_indexes(t)))
                for t in seen.get_table_names()}

    assert shape(old) == shape(new)
    old.close()
    new.close()


def test_concurrent_first_opens_migrate_once(tmp_path, either_catalog):
    import threading

    location = either_catalog or tmp_path / "c.sqlite"
    errors, versions = [], []

    def open_it():
        try:
            cat = Catalog(location)
            versions.append(cat.schema_version())
            cat.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and versions == [SCHEMA_VERSION] * 4
    cat = Catalog(location)
    with cat.engine.connect() as conn:
        assert [r[0] for r in conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY 1")] == \
            list(range(1, SCHEMA_VERSION + 1))
    cat.close()


def test_orm_models_match_the_migrated_tables(catalog):
    with catalog.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            assert table_columns(conn, table.name) == [c.name for c in table.columns], table.name


def test_meta_round_trip(catalog):
    assert catalog.meta() is None
    meta = IndexMeta("ViT-B-32", "laion2b_s34b_b79k", None, None, 512, "3.3.0", '{"kind": "flat"}', "now")
    catalog.set_meta(meta)
    assert catalog.meta() == meta


def test_images_vectors_and_cascading_delete(catalog):
    root = catalog.root_id("/photos")
    assert catalog.root_id("/photos") == root
    a, b = catalog.write_images(root, [
        ImageWrite("a.jpg", 10, 1, "ha", 4, 3, vector=unit(1), precision="bf16"),
        ImageWrite("b.jpg", 0, 1, None, error="cannot decode image"),
    ])
    [cap] = catalog.write_texts(root, [TextWrite("caption", "an a", "t1", "sidecar:a.txt", 1, a, unit(2), "fp32")])
    assert catalog.precisions() == {"bf16": 1, "fp32": 1}
    states = catalog.image_states(root)
    assert states["a.jpg"].sha256 == "ha" and states["b.jpg"].error == "cannot decode image"
    assert catalog.vector_ids("image").tolist() == [a]
    assert catalog.vector_ids("text").tolist() == [cap]
    np.testing.assert_array_equal(catalog.vectors([a], 4)[0], unit(1))
    found = catalog.vectors_for_hashes("image", ["ha", "unknown"])
    assert list(found) == ["ha"]
    np.testing.assert_array_equal(found["ha"][0], unit(1))
    assert found["ha"][1] == "bf16"  # a reused vector keeps the precision it was made in
    assert catalog.vectors_for_hashes("text", ["ha"]) == {}
    views = catalog.items([a, cap])
    assert views[a].path == "/photos/a.jpg" and views[cap].path == "/photos/a.jpg" and views[cap].text == "an a"
    assert catalog.counts() == {"image": 2, "caption": 1, "text": 0, "skipped": 1, "vectors": 2}
    assert sorted(catalog.delete_items([a])) == sorted([a, cap])
    assert catalog.vector_ids("text").tolist() == [] and catalog.counts()["caption"] == 0


def test_overwrite_keeps_id_and_replaces_vector(catalog):
    root = catalog.root_id("/r")
    [a] = catalog.write_images(root, [ImageWrite("a.jpg", 10, 1, "h1", vector=unit(1))])
    [same] = catalog.write_images(root, [ImageWrite("a.jpg", 11, 2, "h2", vector=unit(2), id=a)])
    assert same == a
    np.testing.assert_array_equal(catalog.vectors([a], 4)[0], unit(2))
    assert catalog.vectors_for_hashes("image", ["h1"]) == {}


def test_ids_are_never_reused(catalog):
    root = catalog.root_id("/r")
    [a] = catalog.write_images(root, [ImageWrite("a.jpg", 1, 1, "h", vector=unit(1))])
    catalog.delete_items([a])
    [b] = catalog.write_images(root, [ImageWrite("b.jpg", 1, 1, "h", vector=unit(1))])
    assert b > a


@pytest.mark.sqlite_only
def test_version_1_index_is_upgraded_in_place(tmp_path):
    from legacy_schema import LEGACY_SQLITE as MIGRATIONS

    con = sqlite3.connect(tmp_path / "c.sqlite")
    con.executescript("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);"
                      + MIGRATIONS[0] + "; INSERT INTO schema_version VALUES (1, 'then');"
                      "INSERT INTO roots (path) VALUES ('/photos');")
    con.close()
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.schema_version() == SCHEMA_VERSION and cat.roots() == ["/photos"]
    run_id = cat.add_eval_run("m / none (4-d)", '{"kind": "flat"}', "index", {"text_to_image": {"R@1": 0.5}})
    assert [(r.id, r.result["text_to_image"]["R@1"]) for r in cat.eval_runs()] == [(run_id, 0.5)]


@pytest.mark.sqlite_only
def test_captions_of_images_are_looked_up_by_image_not_by_walking_every_caption(catalog):
    root = catalog.root_id("/photos")
    a, b = catalog.write_images(root, [ImageWrite(f"{n}.jpg", 1, 1, n, vector=unit(i)) for i, n in enumerate("ab")])
    texts = [TextWrite("caption", f"{n} {i}", f"{n}{i}", "sidecar", i, img, unit(10 + i))
             for n, img in (("a", a), ("b", b)) for i in range(2)]
    ids = catalog.write_texts(root, texts + [TextWrite("text", "alone", "t", "texts.txt", 1, None, unit(20))])
    assert catalog.captions_of([a, b, 999]) == {a: [(ids[0], "a 0"), (ids[1], "a 1")],
                                                b: [(ids[2], "b 0"), (ids[3], "b 1")]}
    assert catalog.items([a])[a].path == "/photos/a.jpg"
    # The plan SQLite picks for the statement captions_of runs: the image_id index, whatever the
    # number of captions (filtering on kind in SQL made it walk all of them through the kind index).
    statements = []
    listener = lambda conn, cursor, sql, params, context, many: statements.append((sql, params))  # noqa: E731
    from sqlalchemy import event
    event.listen(catalog.engine, "before_cursor_execute", listener)
    try:
        catalog.captions_of([a, b])
    finally:
        event.remove(catalog.engine, "before_cursor_execute", listener)
    [(sql, params)] = statements
    with catalog.engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, tuple(params)))
    assert "ix_items_image_id" in plan, plan


def test_photo_metadata_is_stored_with_the_image_and_filled_in_later(catalog):
    from indexer.photometa import META_VERSION, PhotoMeta

    meta = PhotoMeta("JPEG", "2021-07-14T18:03:51", "Canon", "EOS 5D", 6, -33.85, 151.2)
    root = catalog.root_id("/photos")
    a, b, c = catalog.write_images(root, [
        ImageWrite("a.jpg", 10, 1, "ha", 4, 3, vector=unit(1), meta=meta),
        ImageWrite("b.png", 10, 1, "hb", 4, 3, vector=unit(2)),  # written before metadata was recorded
        ImageWrite("c.jpg", 0, 1, None, error="cannot decode image"),
    ])
    views = catalog.items([a, b, c])
    assert (views[a].format, views[a].taken_at, views[a].camera_make, views[a].camera_model, views[a].orientation,
            views[a].gps_lat, views[a].gps_lon) == ("JPEG", "2021-07-14T18:03:51", "Canon", "EOS 5D", 6, -33.85, 151.2)
    assert views[b].format is None and views[b].taken_at is None and views[c].gps_lat is None
    states = catalog.image_states(root)
    assert [states[n].meta_version for n in ("a.jpg", "b.png", "c.jpg")] == [META_VERSION, None, None]
    with catalog.engine.connect() as conn:
        before = conn.exec_driver_sql(f"SELECT sha256, width, updated_at FROM items WHERE id = {b}").one()
    assert catalog.update_image_meta([(b, PhotoMeta(format="PNG")), (c, PhotoMeta())]) == 2
    assert catalog.update_image_meta([]) == 0
    states = catalog.image_states(root)
    assert states["b.png"].meta_version == states["c.jpg"].meta_version == META_VERSION  # read, even if empty
    assert catalog.items([b])[b].format == "PNG" and catalog.items([c])[c].format is None
    with catalog.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT sha256, width, updated_at FROM items WHERE id = {b}").one() == before
    # Overwritten by a failed decode: its metadata is gone with its vector.
    catalog.write_images(root, [ImageWrite("a.jpg", 11, 2, "ha2", error="cannot decode image", id=a)])
    assert catalog.items([a])[a].camera_make is None and catalog.image_states(root)["a.jpg"].meta_version is None


@pytest.mark.sqlite_only
def test_version_4_index_gains_the_photo_columns_unread(tmp_path):
    from legacy_schema import LEGACY_SQLITE as MIGRATIONS

    con = sqlite3.connect(tmp_path / "c.sqlite")
    con.executescript("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);"
                      + "; ".join(MIGRATIONS[:4]) + "; INSERT INTO schema_version VALUES (4, 'then');"
                      "INSERT INTO roots (path) VALUES ('/photos');"
                      "INSERT INTO items (kind, root_id, path, size, mtime_ns, sha256, updated_at) "
                      "VALUES ('image', 1, 'a.jpg', 1, 1, 'h', 'then');")
    con.close()
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.schema_version() == SCHEMA_VERSION
    assert cat.image_states(cat.root_id("/photos"))["a.jpg"].meta_version is None
    with cat.engine.connect() as conn:
        indexes = {row[1] for row in conn.exec_driver_sql("PRAGMA index_list(items)")}
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM items WHERE taken_at >= '2021-01-01'"))
    assert "ix_items_taken_at" in indexes and "ix_items_taken_at" in plan
    cat.close()
