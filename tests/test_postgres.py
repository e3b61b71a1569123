"""What a PostgreSQL catalog does beyond the suites that run on both dialects: several writers at once,
one run per root, the folder remembering its catalog, commits seen by searchers, clear errors."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import FakeEncoder, make_image

from indexer import IndexOptions, IndexStore, update_index
from indexer.catalog import Catalog, ImageWrite
from indexer.errors import CatalogError, IndexLocked
from indexer.location import CATALOG_URL_FILE
from indexer.vectors import VectorStore
from retrieval import Searcher

OPTS = IndexOptions(workers=0, progress=False, batch_size=4)


def unit(seed, dim=4):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def cli_index(root, index_dir, url):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CROSSMODAL_CATALOG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "retrieval", "index", str(root), "--index", str(index_dir), "--catalog", url,
         "--model", "crossmodal-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4",
         "--flush-seconds", "0", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_writers_of_different_roots_index_one_catalog_at_once(tmp_path, postgres_catalog):
    roots = [tmp_path / f"root{r}" for r in range(3)]
    for r, root in enumerate(roots):
        for i in range(12):
            make_image(root / f"p{i:02d}.png", seed=100 * r + i)
    index_dir = tmp_path / "idx"
    # the first run creates the catalog's model and type; the others start while it is still writing
    runs = [cli_index(root, index_dir, postgres_catalog) for root in roots]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    with IndexStore.open(index_dir) as store:
        catalog = store.catalog
        assert catalog.counts()["image"] == 36 and sorted(catalog.roots()) == sorted(str(r.resolve()) for r in roots)
        images = catalog.images()
        assert len({v.path for v in images}) == 36  # nothing added twice
        ids = catalog.vector_ids("image")
        assert len(ids) == 36
        # the file the last writer saved holds everyone's vectors, not just its own
        saved = VectorStore.load(store.vector_path("image"), store.spec, store.meta.embed_dim)
        assert np.array_equal(np.sort(saved.ids()), ids)
    with Searcher.open(index_dir) as searcher:
        assert len(searcher.vectors("image")) == 36


def test_a_writer_saves_the_vectors_others_committed_meanwhile(tmp_path, postgres_catalog, monkeypatch, photo_dir):
    monkeypatch.setenv("CROSSMODAL_CATALOG", postgres_catalog)
    encoder = FakeEncoder()
    index_dir = tmp_path / "idx"
    update_index(photo_dir, index_dir, encoder, OPTS)
    with IndexStore.open_for_writing(index_dir, encoder.identity) as store:
        held, _ = store.load_vectors("image")
        other = tmp_path / "other"
        for i in range(3):
            make_image(other / f"x{i}.png", seed=70 + i)
        assert update_index(other, index_dir, encoder, OPTS).added == 3  # committed while this store is open
        root = store.catalog.root_id(tmp_path / "mine")
        [mine] = store.catalog.write_images(root, [ImageWrite("m.png", 1, 1, "hm", vector=unit(5, encoder.identity
                                                                                                 .embed_dim))])
        held.add(np.array([mine]), unit(5, encoder.identity.embed_dim)[None])
        store.save_vectors("image", held)
        saved = VectorStore.load(store.vector_path("image"), store.spec, store.meta.embed_dim)
        assert np.array_equal(np.sort(saved.ids()), store.catalog.vector_ids("image"))
        assert len(saved) == 6 + 3 + 1


def test_one_run_per_root_and_reindex_alone(tmp_path, postgres_catalog, monkeypatch, photo_dir):
    monkeypatch.setenv("CROSSMODAL_CATALOG", postgres_catalog)
    encoder = FakeEncoder()
    update_index(photo_dir, tmp_path / "idx", encoder, OPTS)
    other = tmp_path / "other"
    make_image(other / "x.png", seed=77)
    with IndexStore.open_for_writing(tmp_path / "idx", encoder.identity) as store:
        store.lock_root(photo_dir.resolve())
        with pytest.raises(IndexLocked, match=f"root:{photo_dir.resolve()}"):
            update_index(photo_dir, tmp_path / "idx", encoder, OPTS)
        # another root goes ahead beside it, into the same folder and catalog
        assert update_index(other, tmp_path / "idx", encoder, OPTS).added == 1
        with pytest.raises(IndexLocked, match="writers"):
            IndexStore.open_locked(tmp_path / "idx")
    with IndexStore.open_locked(tmp_path / "idx") as store:  # free once the writer is gone
        assert store.catalog.counts()["image"] == 7


def test_the_folder_remembers_its_catalog(tmp_path, postgres_catalog, invoke, photo_dir, monkeypatch):
    monkeypatch.delenv("CROSSMODAL_CATALOG", raising=False)
    index_dir = tmp_path / "idx"
    invoke("index", photo_dir, "--catalog", postgres_catalog, "--workers", "0", "--no-progress", ok=True)
    pointer = index_dir / CATALOG_URL_FILE
    assert pointer.read_text().strip() == postgres_catalog and not (index_dir / "catalog.sqlite").exists()
    assert stat.S_IMODE(pointer.stat().st_mode) == 0o600  # the URL may carry a password
    assert "img1" in invoke("search", "anything", "-k", "10", ok=True).output  # no --catalog needed any more
    other = postgres_catalog.rsplit("/", 1)[0] + "/elsewhere"
    refused = invoke("search", "anything", "--catalog", other)
    assert refused.exit_code == 1 and "uses the catalog" in refused.output
    monkeypatch.setenv("CROSSMODAL_CATALOG", other)
    refused = invoke("search", "anything")
    assert refused.exit_code == 1 and "CROSSMODAL_CATALOG names" in refused.output
    monkeypatch.delenv("CROSSMODAL_CATALOG")
    invoke("index", photo_dir, "--index", tmp_path / "lite", "--workers", "0", "--no-progress", ok=True)
    refused = invoke("search", "x", "--index", tmp_path / "lite", "--catalog", postgres_catalog)
    assert refused.exit_code == 1 and "has its own SQLite catalog" in refused.output
    refused = invoke("search", "x", "--catalog", "mysql://me@db/photos")
    assert refused.exit_code == 1 and "not a PostgreSQL URL" in refused.output


def test_searchers_see_commits_and_only_commits(postgres_catalog):
    writer, reader = Catalog(postgres_catalog), Catalog(postgres_catalog)
    try:
        root = writer.root_id("/r")
        seen = reader.change_counter()
        from sqlalchemy.orm import Session

        from indexer.catalog import ItemRow

        with Session(writer.engine) as s, s.begin():
            s.add(ItemRow(kind="image", root_id=root, path="a.jpg", updated_at="now"))
            s.flush()
            assert reader.change_counter() == seen  # not committed yet
        assert reader.change_counter() != seen
        seen = reader.change_counter()
        writer.write_images(root, [ImageWrite("b.jpg", 1, 1, "h", vector=unit(1))])
        assert reader.change_counter() != seen
    finally:
        writer.close()
        reader.close()


def test_keyword_search_uses_the_full_text_index(postgres_catalog):
    from indexer.keywords import _match

    catalog = Catalog(postgres_catalog)
    try:
        root = catalog.root_id("/r")
        catalog.write_images(root, [ImageWrite("trips/IMG_1234.jpg", 1, 1, "h", vector=unit(1))])
        sql, params = _match(catalog.dialect, "IMG_1234.jpg")
        with catalog.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: make the planner show it can
            from sqlalchemy import text

            plan = " ".join(row[0] for row in conn.execute(text("EXPLAIN " + sql + " SELECT id FROM m"), params))
        assert "ix_items_words" in plan, plan
    finally:
        catalog.close()


def test_database_trouble_is_one_clear_line(postgres_catalog):
    with pytest.raises(CatalogError, match="could not be read or written: connection failed"):
        Catalog("postgresql://nobody@127.0.0.1:1/nothing")
    Catalog(postgres_catalog).close()
    server = Catalog(postgres_catalog, read_only=True)
    try:
        with pytest.raises(CatalogError, match="read-only transaction"):
            server.root_id("/r")
    finally:
        server.close()


def test_a_model_recorded_between_two_reads_is_no_damage(tmp_path, monkeypatch, photo_dir):
    """A reader opens a shared catalog while its first writer records the model and writes vectors: the
    reader's first look finds no model, the next finds the files. That is a new index, not a damaged one
    (it failed once in CI, with three writers starting on one PostgreSQL catalog)."""
    index_dir = tmp_path / "idx"
    update_index(photo_dir, index_dir, FakeEncoder(), OPTS)
    real = Catalog.meta
    calls = []

    def first_read_too_early(self):
        calls.append(1)
        return None if len(calls) == 1 else real(self)

    monkeypatch.setattr(Catalog, "meta", first_read_too_early)
    with IndexStore.open(index_dir) as store:
        assert store.catalog.counts()["image"] == 6
    # The model truly gone with the vector files still there stays damage.
    monkeypatch.setattr(Catalog, "meta", lambda self: None)
    with pytest.raises(CatalogError, match="records no index, yet image.faiss is there"):
        IndexStore.open(index_dir)
