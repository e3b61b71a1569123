"""Searching while another process updates the index: no errors, no torn reads, counts that add up."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import make_image

from indexer.store import IndexStore
from retrieval.searcher import Searcher

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("either_catalog")]  # on SQLite and on PostgreSQL
ROUNDS = 2


def index(photos, index_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "retrieval", "index", str(photos), "--index", str(index_dir),
                           "--model", "crossmodal-tiny", "--pretrained", "none", "--workers", "0", "--batch-size",
                           "4", "--flush-seconds", "0", "--no-progress"], capture_output=True, text=True, env=env)


def test_queries_during_updates_see_a_consistent_committed_state(tmp_path):
    photos, index_dir = tmp_path / "photos", tmp_path / "idx"
    for i in range(40):
        make_image(photos / f"p{i:03d}.png", seed=i)
    assert index(photos, index_dir).returncode == 0

    errors, checks, done = [], [0], threading.Event()

    def writer():
        try:
            for round_ in range(ROUNDS):  # add 20 images, then remove 15, and so on: it grows and shrinks
                for i in range(20):
                    make_image(photos / f"r{round_}-{i:02d}.png", seed=1000 + 20 * round_ + i)
                result = index(photos, index_dir)
                assert result.returncode == 0, result.stderr
                for i in range(15):
                    (photos / f"r{round_}-{i:02d}.png").unlink()
                result = index(photos, index_dir)
                assert result.returncode == 0, result.stderr
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    rng = np.random.default_rng(0)
    while not done.is_set():
        try:
            with Searcher.open(index_dir) as searcher:
                vectors = searcher.vectors("image")
                # The vector file is brought in line with the catalog as read: committed images, each once.
                held = vectors.ids()
                assert len(np.unique(held)) == len(held) and 40 <= len(held) <= 40 + ROUNDS * 20
                hits = searcher.search_vectors(rng.standard_normal((3, vectors.dim)).astype(np.float32), k=5)
                assert all(hit.path and hit.kind == "image" for row in hits for hit in row)
            checks[0] += 1
        except BaseException as exc:
            errors.append(exc)
            break
    thread.join()
    assert not errors, errors[0]
    assert checks[0] >= 5
    with IndexStore.open(index_dir) as store:
        assert len(store.catalog.vector_ids("image")) == 40 + ROUNDS * 5
