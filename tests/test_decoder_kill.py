"""Decoder processes killed from outside, at random, while a real `crossmodal index` runs: the run
finishes with rc 0 and its index equals an uninterrupted run's (issue 11, item 1)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

N_IMAGES = 160
KILLS = 10


def command(photos: Path, index: Path) -> list[str]:
    return [sys.executable, "-m", "retrieval", "index", str(photos), "--index", str(index), "--model",
            "crossmodal-tiny", "--pretrained", "none", "--workers", "2", "--batch-size", "8",
            "--no-progress", "--json"]


def write_corpus(photos: Path) -> None:
    # PNGs of 1280x960 (no DCT scaling to shortcut the decode): ~30 ms each, so decoding is most of the
    # run and kills land while workers hold files.
    rng = np.random.default_rng(11)
    photos.mkdir()
    for i in range(N_IMAGES):
        blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((1280, 960), Image.BICUBIC).save(photos / f"p{i:03d}.png", compress_level=1)


def decoders_of(pid: int) -> list[int]:
    """Pids of the regular decoder workers of process ``pid`` (not the ones retrying a file alone)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 1 :].split()[1])
        if parent == pid and name == "cm-decoder":
            found.append(int(entry))
    return sorted(found)


def committed_images(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM vectors").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def image_vectors(index: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(index / "catalog.sqlite") as db:
        rows = db.execute("SELECT items.path, items.error, vectors.data FROM items LEFT JOIN vectors "
                          "ON vectors.item_id = items.id WHERE items.kind = 'image'").fetchall()
    assert all(error is None for _, error, _ in rows), [r[:2] for r in rows if r[1]]
    return {path: np.frombuffer(data, dtype=np.float32) for path, _, data in rows}


def test_killing_decoder_workers_at_random_never_ends_the_run(tmp_path):
    photos = tmp_path / "photos"
    write_corpus(photos)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = subprocess.run(command(photos, tmp_path / "ref"), capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr

    rng = np.random.default_rng(2026)
    index = tmp_path / "idx"
    process = subprocess.Popen(command(photos, index), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    landed = 0
    try:
        # Seeded points of progress (images committed), so the kills land mid-run however fast it goes.
        # Then a random delay within a batch's time, so kills also land while the model encodes.
        for target in np.sort(rng.choice(np.arange(4, N_IMAGES - 96), KILLS, replace=False)):
            while process.poll() is None and committed_images(index) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.25))
            workers = decoders_of(process.pid)
            while not workers and process.poll() is None:  # between a death and its replacement
                time.sleep(0.01)
                workers = decoders_of(process.pid)
            if process.poll() is not None:
                break
            os.kill(workers[int(rng.integers(len(workers)))], signal.SIGKILL)
            landed += 1
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    print(f"{landed} of {KILLS} kills landed while the run was in progress")
    assert landed == KILLS, "the run ended before every kill: make the corpus slower to decode"
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "DataLoader" not in stderr, stderr
    summary = json.loads(stdout)
    assert summary["skipped"] == 0 and summary["added"] == N_IMAGES

    got, want = image_vectors(tmp_path / "idx"), image_vectors(tmp_path / "ref")
    assert sorted(got) == sorted(want)
    for path, vector in want.items():
        np.testing.assert_allclose(got[path], vector, atol=1e-5)
