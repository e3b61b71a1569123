"""A real `crossmodal index` killed with SIGKILL at random moments, resumed each time, ends where an
uninterrupted run ends: the same items, the same vectors, nothing twice, nothing encoded twice."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_image

from indexer.store import IndexStore
from indexer.vectors import VectorStore

pytestmark = pytest.mark.slow

N_IMAGES = 160
KILLS = 6


def command(photos, index):
    # Small batches and a vector-file write every 0.2 s, so kills land in commits and FAISS writes too.
    return [sys.executable, "-m", "retrieval", "index", str(photos), "--index", str(index), "--model",
            "crossmodal-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4",
            "--flush-seconds", "0.2", "--no-progress", "--json"]


def committed_images(index) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM items JOIN vectors ON vectors.item_id = items.id "
                              "WHERE items.kind = 'image'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def snapshot(index):
    """(path -> image vector, sorted (path, caption) pairs, caption vectors by pair) as the index answers."""
    with IndexStore.open(index) as store:
        out = {}
        for modality in ("image", "text"):
            ids = store.catalog.vector_ids(modality)
            items = store.catalog.items(ids.tolist())
            vectors = store.fetch_vectors(ids)
            out[modality] = {(items[i].path, items[i].text): v for i, v in zip(ids.tolist(), vectors)}
        return out


def check_consistent(index):
    """What the crash left opens, and vector files hold catalog vectors only, each once."""
    if not (index / "catalog.sqlite").exists():
        return 0
    try:
        store = IndexStore.open(index)
    except Exception as exc:  # an index whose first run died before recording its model is "empty"
        assert "empty" in str(exc), exc
        return 0
    with store:
        for modality in ("image", "text"):
            expected = store.catalog.vector_ids(modality)
            path = store.vector_path(modality)
            if path.exists():
                on_disk = VectorStore.load(path, store.spec, store.meta.embed_dim).ids()
                assert len(np.unique(on_disk)) == len(on_disk), "an id twice in a vector file"
                assert np.isin(on_disk, expected).all(), "a vector file holds what the catalog does not"
            held, _ = store.load_vectors(modality)
            assert sorted(held.ids().tolist()) == expected.tolist()
        return len(store.catalog.vector_ids("image"))


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    photos = tmp_path / "photos"
    for i in range(N_IMAGES):
        make_image(photos / f"d{i % 7}" / f"p{i:03d}.{'png' if i % 3 else 'jpg'}", seed=i, size=(48 + i % 5, 40))
        if i % 4 == 0:
            (photos / f"d{i % 7}" / f"p{i:03d}.txt").write_text(f"caption of picture {i}\nanother line {i}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = subprocess.run(command(photos, tmp_path / "ref"), capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr

    index = tmp_path / "idx"
    rng = np.random.default_rng(2026)
    committed = 0
    for attempt in range(KILLS):
        process = subprocess.Popen(command(photos, index), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env)
        # Kill at a seeded random point of progress (images committed), or early during start-up.
        target = committed + int(rng.integers(1, max(2, (N_IMAGES - committed) // 2)))
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.0))
        else:
            while process.poll() is None and committed_images(index) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = check_consistent(index)
        assert now >= committed  # what was committed survives
        committed = now
    assert 0 < committed < N_IMAGES, "the kills should land mid-run"

    final = subprocess.run(command(photos, index), capture_output=True, text=True, env=env)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["encoded_images"] == N_IMAGES - committed  # committed work is not encoded again
    assert check_consistent(index) == N_IMAGES

    got, want = snapshot(index), snapshot(tmp_path / "ref")
    for modality in ("image", "text"):
        assert sorted(got[modality]) == sorted(want[modality]), modality  # same items, none twice
        for key, vector in want[modality].items():
            np.testing.assert_allclose(got[modality][key], vector, atol=1e-5)
    assert subprocess.run([sys.executable, "-m", "retrieval", "verify", "--index", str(index)],
                          capture_output=True, env=env).returncode == 0


def test_ctrl_c_stops_after_the_batch_in_hand_and_says_how_to_resume(tmp_path):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    for i in range(N_IMAGES):
        make_image(photos / f"p{i:03d}.png", seed=i)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command(photos, index), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    while process.poll() is None and committed_images(index) < 20:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "stopping after this batch" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    committed = check_consistent(index)
    assert 20 <= committed < N_IMAGES
    final = subprocess.run(command(photos, index), capture_output=True, text=True, env=env)
    assert json.loads(final.stdout)["encoded_images"] == N_IMAGES - committed
