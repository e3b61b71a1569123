"""Incremental indexing with the fake encoder: what gets encoded, kept, moved and removed."""

import os
import shutil

import numpy as np
import pytest
from conftest import FakeEncoder, make_image

from indexer import IndexOptions, IndexStore, update_index
from indexer.errors import IndexLocked, ModelMismatch, SourceError
from indexer.vectors import VectorStore
from retrieval import Searcher

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
    with IndexStore.open_for_writing(index, fake_encoder.identity, OPTS.spec):
        with pytest.raises(IndexLocked, match="another crossmodal process"):
            run(photo_dir, index, fake_encoder)


def test_missing_root_and_bad_captions_file_stop_before_any_work(tmp_path, fake_encoder):
    with pytest.raises(SourceError, match="folder not found"):
        run(tmp_path / "nope", tmp_path / "idx", fake_encoder)
    (tmp_path / "root").mkdir()
    bad = tmp_path / "caps.csv"
    bad.write_text("wrong,header\n")
    with pytest.raises(SourceError, match="caption"):
        run(tmp_path / "root", tmp_path / "idx", fake_encoder, captions=(bad,))
    assert not (tmp_path / "idx").exists()
