"""crossmodal verify: finds what is wrong between catalog and vector files, and --repair mends it."""

import json
import os

import numpy as np
import pytest

from indexer.store import IndexStore
from indexer.vectors import VectorStore

pytestmark = pytest.mark.usefixtures("either_catalog")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def indexed(invoke, photo_dir, tmp_path):
    assert invoke("index", photo_dir, "--workers", "0", "--no-progress").exit_code == 0
    return tmp_path / "idx"


def verify(invoke, *args):
    result = invoke("verify", "--json", *args)
    return result.exit_code, json.loads(result.output)


def test_a_fresh_index_verifies(invoke, indexed):
    code, report = verify(invoke)
    assert code == 0 and report["ok"] and report["vectors"]["image"]["catalog"] == 6
    assert report["vectors"]["text"] == {"catalog": 2, "file": 2, "missing": 0, "extra": 0, "duplicates": 0,
                                         "problem": None, "ok": True}
    assert "ok" in invoke("verify").output.splitlines()[-1]


@pytest.mark.parametrize("damage", ["deleted", "garbage", "extra-and-duplicate", "leftover"])
def test_damage_is_found_and_repaired_from_the_catalog(invoke, indexed, damage):
    path = indexed / "image.faiss"
    if damage == "deleted":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "extra-and-duplicate":
        with IndexStore.open(indexed) as store:
            held = VectorStore.load(path, store.spec, store.meta.embed_dim)
        first = held.ids()[:1]
        held.add(np.array([999_999]), np.ones((1, held.dim), np.float32))
        held.add(first, np.ones((1, held.dim), np.float32))
        held.save(path)
    else:
        (indexed / ".image.faiss.tmp-999999999").write_bytes(b"half a file")
    code, report = verify(invoke)
    assert code == 1 and not report["ok"]
    image = report["vectors"]["image"]
    if damage == "extra-and-duplicate":
        assert (image["extra"], image["duplicates"]) == (1, 1)
    elif damage == "leftover":
        assert report["temp_files"] == [str(indexed / ".image.faiss.tmp-999999999")]
    else:
        assert "missing" in image["problem"] or "is damaged" in image["problem"]

    code, repaired = verify(invoke, "--repair")
    assert code == 0 and repaired["ok"] and repaired["repaired"], repaired
    assert verify(invoke) == (0, {**verify(invoke)[1], "ok": True})
    assert not list(indexed.glob(".*.tmp-*"))


def test_images_gone_from_disk_are_reported_not_removed(invoke, indexed, photo_dir):
    (photo_dir / "img1.png").unlink()
    code, report = verify(invoke)
    assert code == 0 and report["missing_files"] == [str(photo_dir / "img1.png")]
    assert "run `crossmodal index` on their folder" in invoke("verify").output
    assert verify(invoke, "--no-files")[1]["missing_files"] == []


def test_verify_without_an_index_is_a_clear_error(invoke):
    result = invoke("verify")
    assert result.exit_code == 1 and "no index at" in result.output


def test_a_full_disk_while_writing_leaves_the_previous_index_intact(invoke, indexed, photo_dir, monkeypatch):
    import faiss
    import sqlalchemy

    before = (indexed / "image.faiss").read_bytes()
    (photo_dir / "new.png").write_bytes((photo_dir / "img1.png").read_bytes()[:-1] + b"\x00")

    def full_disk(*_args, **_kwargs):
        raise RuntimeError("Error in faiss::FileIOWriter: No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(faiss, "write_index", full_disk)
        result = invoke("index", photo_dir, "--workers", "0", "--no-progress")
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert "previous file is unchanged" in result.output and "Traceback" not in result.output
    assert (indexed / "image.faiss").read_bytes() == before

    def catalog_full(conn, _cursor, statement, *_args):
        # what the database driver raises when its disk fills up, from inside the statement
        if statement.lstrip().upper().startswith("INSERT INTO ITEMS"):
            raise conn.dialect.loaded_dbapi.OperationalError("database or disk is full")

    (photo_dir / "newer.png").write_bytes((photo_dir / "img2.png").read_bytes()[:-1] + b"\x01")
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", catalog_full)
    try:
        result = invoke("index", photo_dir, "--workers", "0", "--no-progress")
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", catalog_full)
    assert result.exit_code == 1 and "database or disk is full" in result.output and "Traceback" not in result.output
    assert verify(invoke)[0] in (0, 1)  # opens; a lagging vector file is what --repair or the next run mends
    assert invoke("search", "anything", "--json").exit_code == 0
    assert invoke("verify", "--repair").exit_code == 0
