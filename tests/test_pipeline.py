"""Incremental indexing with the fake encoder: what gets encoded, kept, moved and removed."""

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder, make_image

from indexer import IndexOptions, IndexStore, update_index
from indexer.errors import IndexLocked, ModelMismatch, SourceError
from indexer.location import catalog_location
from indexer.skips import PILLOW_VERSION
from indexer.vectors import VectorStore
from retrieval import Searcher

pytestmark = pytest.mark.usefixtures("either_catalog")  # each test on SQLite and on PostgreSQL

OPTS = IndexOptions(workers=0, progress=False, batch_size=4)


def run(root, index, encoder, **kw):
    options = IndexOptions(**{**OPTS.__dict__, **kw})
    return update_index(root, index, encoder, options)


def consistent(index):
    """Every catalog vector is in FAISS exactly once, and nothing else is."""
    with IndexStore.open(index) as store:
        for modality in ("image", "text"):
            ids = store.catalog.vector_ids(modality)
            on_disk = store.vector_path(modality)
            held = np.array([], dtype=np.int64)
            if on_disk.exists():
                held = VectorStore.load(on_disk, store.spec, store.meta.embed_dim).ids()
            assert sorted(held.tolist()) == ids.tolist(), modality
            assert len(set(held.tolist())) == len(held)


def test_first_run_indexes_images_and_sidecar_captions(photo_dir, tmp_path, fake_encoder):
    s = run(photo_dir, tmp_path / "idx", fake_encoder)
    assert (s.added, s.updated, s.removed, s.moved, s.unchanged, s.skipped) == (6, 0, 0, 0, 0, 0)
    assert s.texts_added == 2 and fake_encoder.images_encoded == 6
    assert set(s.stages) >= {"walk", "plan", "decode", "encode", "write", "texts", "flush"}
    consistent(tmp_path / "idx")


def test_second_run_encodes_nothing(photo_dir, tmp_path, fake_encoder):
    run(photo_dir, tmp_path / "idx", fake_encoder)
    again = FakeEncoder()
    s = run(photo_dir, tmp_path / "idx", again)
    assert (s.added, s.unchanged, s.texts_added, s.texts_unchanged) == (0, 6, 0, 2)
    assert again.images_encoded == 0 and again.texts_encoded == 0


def test_add_change_delete_move(photo_dir, tmp_path, fake_encoder):
    index = tmp_path / "idx"
    run(photo_dir, index, fake_encoder)
    with IndexStore.open(index) as store:
        before = store.catalog.image_states(store.catalog.root_id(photo_dir.resolve()))
    make_image(photo_dir / "new.png", seed=20)
    make_image(photo_dir / "img1.png", seed=21)  # same path, new content
    os.remove(photo_dir / "img2.png")
    shutil.move(photo_dir / "img0.png", photo_dir / "sub" / "renamed.png")
    shutil.move(photo_dir / "img0.txt", photo_dir / "sub" / "renamed.txt")
    enc = FakeEncoder()
    s = run(photo_dir, index, enc)
    assert (s.added, s.updated, s.removed, s.moved) == (1, 1, 1, 1)
    assert enc.images_encoded == 2  # the moved file is not encoded again
    with IndexStore.open(index) as store:
        after = store.catalog.image_states(store.catalog.root_id(photo_dir.resolve()))
    assert after["sub/renamed.png"].id == before["img0.png"].id
    assert after["img1.png"].id == before["img1.png"].id and after["img1.png"].sha256 != before["img1.png"].sha256
    assert "img2.png" not in after
    consistent(index)
    with Searcher.open(index, encoder=enc) as searcher:
        hit = searcher.search_image(photo_dir / "img1.png", to="image", k=1)[0]
        assert hit.path == str(photo_dir.resolve() / "img1.png") and hit.score == pytest.approx(1, abs=1e-5)
        captions = searcher.search_text("a first caption", to="text", k=1)
        assert captions[0].path == str(photo_dir.resolve() / "sub" / "renamed.png")


def test_touched_but_identical_file_is_not_reencoded(photo_dir, tmp_path, fake_encoder):
    run(photo_dir, tmp_path / "idx", fake_encoder)
    os.utime(photo_dir / "img3.png", ns=(1, 1))
    enc = FakeEncoder()
    s = run(photo_dir, tmp_path / "idx", enc)
    assert s.unchanged == 6 and enc.images_encoded == 0


def test_identical_files_are_encoded_once(tmp_path, fake_encoder):
    root = tmp_path / "dups"
    make_image(root / "a.png", seed=1)
    for name in ("b.png", "c/d.png"):
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copy(root / "a.png", root / name)
    (root / "y.png").write_bytes((root / "a.png").read_bytes())
    (root / "a.txt").write_text("same words\n")
    (root / "y.txt").write_text("same words\n")
    s = run(root, tmp_path / "idx", fake_encoder)
    assert (s.added, s.texts_added) == (4, 2)
    assert (fake_encoder.images_encoded, fake_encoder.texts_encoded, s.duplicates) == (1, 1, 4)


def test_unreadable_images_are_recorded_and_the_run_goes_on(photo_dir, tmp_path, fake_encoder):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (photo_dir / "empty.png").write_bytes(b"")
    s = run(photo_dir, tmp_path / "idx", fake_encoder)
    assert s.added == 6 and s.skipped == 2
    assert any("broken.jpg" in p for p in s.problems)
    with IndexStore.open(tmp_path / "idx") as store:
        skipped = {v.path.rsplit("/", 1)[1]: v.error for v in store.catalog.skipped()}
    assert set(skipped) == {"broken.jpg", "empty.png"} and "cannot decode" in skipped["broken.jpg"]
    # Unchanged broken files are not retried, but still counted.
    s = run(photo_dir, tmp_path / "idx", FakeEncoder())
    assert s.skipped == 2 and s.unchanged == 6


def test_captions_file_and_texts_are_synced(photo_dir, tmp_path, fake_encoder):
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image": "img1.png", "captions": ["red blocks", "blue blocks"]}\n'
                    '{"image": "missing.png", "caption": "nowhere"}\n')
    texts = tmp_path / "texts.txt"
    texts.write_text("a standalone note\n")
    s = run(photo_dir, tmp_path / "idx", fake_encoder, captions=(caps,), texts=(texts,))
    assert s.texts_added == 5 and any("missing.png" in p for p in s.problems)
    caps.write_text('{"image": "img1.png", "captions": ["red blocks"]}\n')
    s = run(photo_dir, tmp_path / "idx", FakeEncoder(), captions=(caps,))
    assert (s.texts_added, s.texts_removed) == (0, 1)  # texts file not passed: its texts stay
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.catalog.counts()["text"] == 1 and store.catalog.counts()["caption"] == 3


def test_interrupted_run_resumes_without_duplicates(photo_dir, tmp_path):
    class Crashing(FakeEncoder):
        def encode_images(self, pixels):
            if self.images_encoded >= 4:
                raise KeyboardInterrupt
            return super().encode_images(pixels)

    index = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        run(photo_dir, index, Crashing(), batch_size=2)
    consistent(index)
    with IndexStore.open(index) as store:
        assert store.catalog.counts()["image"] == 4
    enc = FakeEncoder()
    s = run(photo_dir, index, enc, batch_size=2)
    assert enc.images_encoded == 2 and s.unchanged == 4 and s.added == 2
    consistent(index)


def test_stale_vector_file_is_resynced_from_the_catalog(photo_dir, tmp_path, fake_encoder):
    index = tmp_path / "idx"
    run(photo_dir, index, fake_encoder)
    (index / "image.faiss").unlink()  # as if the process died before its first flush
    with Searcher.open(index, encoder=fake_encoder) as searcher:
        assert searcher.search_image(photo_dir / "img3.png", to="image", k=1)[0].path.endswith("img3.png")
    run(photo_dir, index, FakeEncoder())
    consistent(index)


def test_worker_processes_give_the_same_vectors(photo_dir, tmp_path):
    run(photo_dir, tmp_path / "a", FakeEncoder(), workers=0)
    run(photo_dir, tmp_path / "b", FakeEncoder(), workers=2)
    with IndexStore.open(tmp_path / "a") as a, IndexStore.open(tmp_path / "b") as b:
        ids_a, ids_b = a.catalog.vector_ids("image"), b.catalog.vector_ids("image")
        np.testing.assert_array_equal(a.catalog.vectors(ids_a.tolist(), 32), b.catalog.vectors(ids_b.tolist(), 32))


def test_other_model_is_refused_and_lock_is_exclusive(photo_dir, tmp_path, fake_encoder):
    index = tmp_path / "idx"
    run(photo_dir, index, fake_encoder)
    with pytest.raises(ModelMismatch, match="fake / none .*other / none"):
        run(photo_dir, index, FakeEncoder(name="other"))
    with IndexStore.open_for_writing(index, fake_encoder.identity, OPTS.spec) as store:
        store.lock_root(photo_dir.resolve())  # SQLite: the folder is locked already; PostgreSQL: one run per root
        with pytest.raises(IndexLocked, match="another crossmodal process"):
            run(photo_dir, index, fake_encoder)
        with pytest.raises(IndexLocked, match="another crossmodal process"):
            IndexStore.open_locked(index)  # reindex and verify have the index to themselves


def test_missing_root_and_bad_captions_file_stop_before_any_work(tmp_path, fake_encoder):
    with pytest.raises(SourceError, match="folder not found"):
        run(tmp_path / "nope", tmp_path / "idx", fake_encoder)
    (tmp_path / "root").mkdir()
    bad = tmp_path / "caps.csv"
    bad.write_text("wrong,header\n")
    with pytest.raises(SourceError, match="caption"):
        run(tmp_path / "root", tmp_path / "idx", fake_encoder, captions=(bad,))
    assert not (tmp_path / "idx").exists()


def test_raising_max_megapixels_retries_what_it_skipped(photo_dir, tmp_path, fake_encoder):
    index = tmp_path / "idx"
    make_image(photo_dir / "big.png", seed=30, size=(200, 100))  # 0.02 megapixels
    s = run(photo_dir, index, fake_encoder, max_megapixels=0.01)
    assert (s.added, s.skipped, s.retried) == (6, 1, 0)
    s = run(photo_dir, index, FakeEncoder(), max_megapixels=0.01)
    assert (s.skipped, s.retried) == (1, 0)  # the same bound: nothing to try again
    s = run(photo_dir, index, FakeEncoder(), max_megapixels=0.015)
    assert (s.skipped, s.retried, s.updated) == (1, 1, 0)  # raised, not enough: tried once, recorded again
    s = run(photo_dir, index, FakeEncoder(), max_megapixels=0.015)
    assert (s.skipped, s.retried) == (1, 0)
    enc = FakeEncoder()
    s = run(photo_dir, index, enc, max_megapixels=0.05)
    assert (s.skipped, s.retried, s.updated, enc.images_encoded) == (0, 1, 1, 1)
    consistent(index)


def mark_skipped(index, root, rel, skip_info):
    """Record ``rel`` (unchanged on disk) as skipped, as a run with other settings or an older version left it."""
    from indexer.catalog import Catalog, ImageWrite

    catalog = Catalog(catalog_location(index))
    state = catalog.image_states(catalog.root_id(root.resolve()))[rel]
    catalog.write_images(catalog.root_id(root.resolve()), [ImageWrite(
        rel, state.size, state.mtime_ns, state.sha256, error="cannot decode image: OSError: bug", id=state.id,
        skip_info=skip_info)])
    catalog.close()


@pytest.mark.parametrize("skip_info,flag", [
    (None, True),  # written before skip_info existed: retried with --retry-skipped only
    ('{"cause": "undecodable", "pillow": "0.0.1"}', False),  # another Pillow than the one that failed
    ('{"cause": "unreadable"}', False),  # permissions may have been fixed
    ('{"cause": "undecodable", "pillow": "' + PILLOW_VERSION + '"}', True),
])
def test_a_skipped_file_is_retried_when_the_reason_may_have_gone(photo_dir, tmp_path, fake_encoder, skip_info, flag):
    index = tmp_path / "idx"
    run(photo_dir, index, fake_encoder)
    mark_skipped(index, photo_dir, "img1.png", skip_info)
    if flag:
        s = run(photo_dir, index, FakeEncoder())
        assert (s.skipped, s.retried, s.unchanged) == (1, 0, 5)  # without the flag: as before, until it changes
    s = run(photo_dir, index, FakeEncoder(), retry_skipped=flag)
    assert (s.skipped, s.retried, s.updated) == (0, 1, 1)
    s = run(photo_dir, index, FakeEncoder(), retry_skipped=flag)
    assert (s.skipped, s.retried, s.unchanged) == (0, 0, 6)
    consistent(index)


def test_a_root_emptied_by_an_unmounted_disk_is_refused_without_allow_empty(photo_dir, tmp_path, fake_encoder):
    index = tmp_path / "idx"
    run(photo_dir, index, fake_encoder)
    shutil.move(photo_dir, tmp_path / "on-the-disk")
    photo_dir.mkdir()  # the empty mount point
    with pytest.raises(SourceError) as refused:
        run(photo_dir, index, FakeEncoder())
    assert str(refused.value) == (f"{photo_dir.resolve()} holds no images now but the index has 6 from it; if they "
                                  "were really deleted, run again with --allow-empty")
    photo_dir.rmdir()
    with pytest.raises(SourceError, match="folder not found"):
        run(photo_dir, index, FakeEncoder())
    with IndexStore.open(index) as store:
        assert (store.catalog.counts()["image"], store.catalog.counts()["caption"]) == (6, 2)
    shutil.move(tmp_path / "on-the-disk", photo_dir)  # mounted again
    enc = FakeEncoder()
    s = run(photo_dir, index, enc)
    assert (s.unchanged, s.texts_unchanged, enc.images_encoded) == (6, 2, 0)
    for child in photo_dir.rglob("*"):
        if child.is_file():
            child.unlink()
    s = run(photo_dir, index, FakeEncoder(), allow_empty=True)
    assert s.removed == 6
    with IndexStore.open(index) as store:
        assert (store.catalog.counts()["image"], store.catalog.counts()["caption"]) == (0, 0)
    consistent(index)


def test_a_folder_on_a_disk_that_is_not_mounted_keeps_its_images_and_captions(photo_dir, tmp_path, fake_encoder):
    index, disk = tmp_path / "idx", tmp_path / "disk"
    make_image(disk / "trip" / "x.png", seed=40)
    make_image(disk / "trip" / "y.png", seed=41)
    (disk / "trip" / "x.txt").write_text("a trip caption\n")
    (photo_dir / "external").symlink_to(disk / "trip", target_is_directory=True)
    s = run(photo_dir, index, fake_encoder)
    assert (s.added, s.texts_added) == (8, 3)
    disk.rename(tmp_path / "unplugged")
    s = run(photo_dir, index, FakeEncoder())
    assert (s.removed, s.texts_removed, s.unchanged, s.texts_unchanged) == (0, 0, 6, 3)
    assert (s.unreadable, s.kept_unread) == (1, 2)
    assert any("external: broken symlink" in p for p in s.problems)
    (tmp_path / "unplugged").rename(disk)
    enc = FakeEncoder()
    s = run(photo_dir, index, enc)
    assert (s.unchanged, s.texts_unchanged, s.unreadable, enc.images_encoded, enc.texts_encoded) == (8, 3, 0, 0, 0)
    consistent(index)


UNPRIVILEGED_RUN = """
import json, sys
sys.path[:0] = [sys.argv[3]]
from conftest import FakeEncoder
from indexer import IndexOptions, update_index

summary = update_index(sys.argv[1], sys.argv[2], FakeEncoder(), IndexOptions(workers=0, progress=False))
print(json.dumps(summary.as_dict()))
"""


def _without_read_override() -> None:
    # Root reads a mode-000 folder through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. Dropped from the
    # bounding set before exec, the child runs as root without them and is denied like anyone else.
    prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux; elsewhere the probe below skips the test
    if os.geteuid() == 0 and prctl is not None:
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; a failure shows in the probe below


def as_denied(*args):
    import indexer

    env = {**os.environ, "PYTHONPATH": str(Path(indexer.__file__).resolve().parent.parent)}  # the code under test
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          preexec_fn=_without_read_override, timeout=300)


def test_a_folder_the_indexer_may_not_read_keeps_its_images_and_captions(tmp_path, fake_encoder):
    root, locked = tmp_path / "photos", tmp_path / "photos" / "private"
    make_image(root / "open.png", seed=1)
    make_image(locked / "a.png", seed=2)
    make_image(locked / "b.png", seed=3)
    (locked / "a.txt").write_text("a private caption\n")
    run(root, tmp_path / "idx", fake_encoder)
    locked.chmod(0)
    try:
        if as_denied("-c", f"import os; os.listdir({str(locked)!r})").returncode == 0:
            pytest.skip("cannot deny this process a mode-000 folder here")
        result = as_denied("-c", UNPRIVILEGED_RUN, str(root), str(tmp_path / "idx"),
                           str(Path(__file__).resolve().parent))
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["removed"], summary["texts_removed"], summary["unchanged"]) == (0, 0, 1)
    assert (summary["unreadable"], summary["kept_unread"]) == (1, 2)
    assert f"{locked}: cannot read directory: Permission denied; what was indexed under it is kept" \
        in summary["problems"]
    with IndexStore.open(tmp_path / "idx") as store:
        assert (store.catalog.counts()["image"], store.catalog.counts()["caption"]) == (3, 1)


# -- photo metadata (indexer.photometa) ----------------------------------------------------------
PHOTO_COLUMNS = "format, taken_at, camera_make, camera_model, orientation, gps_lat, gps_lon, meta_version"


def photo_corpus(root):
    """Four camera JPEGs (two with GPS, one turned) and a PNG without EXIF."""
    from indexer.synth import stamp_photo_meta

    stamp_photo_meta(make_image(root / "a.jpg", seed=1, fmt="JPEG"), taken_at="2021-07-14T18:03:51", make="Canon",
                     model="EOS 5D", gps=(-33.8568, 151.2153), orientation=6)
    stamp_photo_meta(make_image(root / "b.jpg", seed=2, fmt="JPEG"), taken_at="2019-01-02T03:04:05", make="Apple",
                     model="iPhone 8", gps=(48.8584, 2.2945))
    stamp_photo_meta(make_image(root / "c.jpg", seed=3, fmt="JPEG"), make="Sony", taken_at="0000:00:00 00:00:00")
    stamp_photo_meta(make_image(root / "d.jpg", seed=4, fmt="JPEG"), model="DSC-RX100")
    make_image(root / "e.png", seed=5)
    return root


def photo_rows(index):
    from indexer.catalog import Catalog

    catalog = Catalog(catalog_location(index))
    try:
        with catalog.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"SELECT path, {PHOTO_COLUMNS} FROM items WHERE kind = 'image'")
            return {rel: list(rest) for rel, *rest in rows}
    finally:
        catalog.close()


def forget_photo_meta(index):
    """Null the metadata columns, as an index built before schema v5 has them once migrated."""
    from indexer.catalog import Catalog

    catalog = Catalog(catalog_location(index))
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE items SET " + ", ".join(f"{c} = NULL" for c in PHOTO_COLUMNS.split(", ")))
    catalog.close()


def test_photo_metadata_is_recorded_while_indexing(tmp_path, fake_encoder):
    root = photo_corpus(tmp_path / "photos")
    s = run(root, tmp_path / "idx", fake_encoder)
    assert (s.added, s.metadata_filled) == (5, 0)
    assert photo_rows(tmp_path / "idx") == {
        "a.jpg": ["JPEG", "2021-07-14T18:03:51", "Canon", "EOS 5D", 6, -33.8568, 151.2153, 1],
        "b.jpg": ["JPEG", "2019-01-02T03:04:05", "Apple", "iPhone 8", None, 48.8584, 2.2945, 1],
        "c.jpg": ["JPEG", None, "Sony", None, None, None, None, 1],
        "d.jpg": ["JPEG", None, None, "DSC-RX100", None, None, None, 1],
        "e.png": ["PNG", None, None, None, None, None, None, 1],
    }
    with IndexStore.open(tmp_path / "idx") as store:
        views = {v.path.rsplit("/", 1)[1]: v for v in store.catalog.images()}
    assert (views["a.jpg"].width, views["a.jpg"].height, views["a.jpg"].camera_make) == (30, 40, "Canon")


def test_an_index_from_before_photo_metadata_is_filled_in_without_encoding(tmp_path, fake_encoder):
    root, index = photo_corpus(tmp_path / "photos"), tmp_path / "idx"
    run(root, index, fake_encoder)
    recorded = photo_rows(index)
    forget_photo_meta(index)
    (root / "sub").mkdir()
    shutil.move(root / "b.jpg", root / "sub" / "b.jpg")  # moved and touched files are kept: filled in too
    os.utime(root / "c.jpg", ns=(1, 1))
    enc = FakeEncoder()
    s = run(root, index, enc)
    assert (s.added, s.updated, s.moved, s.unchanged, s.encoded_images, enc.images_encoded) == (0, 0, 1, 4, 0, 0)
    assert s.metadata_filled == 5 and "metadata" in s.stages
    recorded["sub/b.jpg"] = recorded.pop("b.jpg")
    assert photo_rows(index) == recorded
    s = run(root, index, FakeEncoder())
    assert s.metadata_filled == 0
    consistent(index)


def test_a_kept_file_whose_header_is_unreadable_is_read_once_and_the_run_goes_on(tmp_path, fake_encoder):
    root, index = photo_corpus(tmp_path / "photos"), tmp_path / "idx"
    run(root, index, fake_encoder)
    forget_photo_meta(index)
    stat = (root / "a.jpg").stat()  # garbage now, but the same size and mtime: the plan keeps it unchanged
    (root / "a.jpg").write_bytes(b"\0" * stat.st_size)
    os.utime(root / "a.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    s = run(root, index, FakeEncoder())
    assert (s.unchanged, s.metadata_filled) == (5, 5)
    assert photo_rows(index)["a.jpg"] == [None] * 7 + [1]
    assert run(root, index, FakeEncoder()).metadata_filled == 0  # not read again every run


def test_filling_in_metadata_stops_between_batches_on_ctrl_c(tmp_path, fake_encoder, monkeypatch):
    import signal

    import indexer.pipeline
    from indexer.errors import Interrupted

    root, index = photo_corpus(tmp_path / "photos"), tmp_path / "idx"
    run(root, index, fake_encoder)
    forget_photo_meta(index)
    read = indexer.pipeline.read_photo_meta
    calls = []

    def read_then_interrupt(path):
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop once the batch in hand is committed
        return read(path)

    monkeypatch.setattr(indexer.pipeline, "METADATA_BATCH", 2)
    monkeypatch.setattr(indexer.pipeline, "read_photo_meta", read_then_interrupt)
    with pytest.raises(Interrupted):
        run(root, index, FakeEncoder())
    assert len(calls) == 2 and sum(row[-1] is not None for row in photo_rows(index).values()) == 2
    monkeypatch.setattr(indexer.pipeline, "read_photo_meta", read)
    assert run(root, index, FakeEncoder()).metadata_filled == 3
