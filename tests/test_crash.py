"""Real commands killed with SIGKILL while they work, resumed each time, end where an uninterrupted run ends.

Each test first times an uninterrupted run, then kills the command at seeded points spread over that
duration, counting only kills that land while the command works: it holds the index's write lock and
is still running. After every kill what is on disk must open and agree with the catalog; the resumed
command must end in the same index as the uninterrupted run (same items, same vectors, vector files
holding exactly the catalog's vectors). Decoding runs in the main process (--workers 0), so a kill
is a kill of all of the command.
"""

import io
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from indexer.errors import CrossmodalError, VectorFileError
from indexer.store import IndexStore
from indexer.vectors import StaleVectorFile, VectorStore
from indexer.verify import verify

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
MODEL = ["--model", "crossmodal-tiny", "--pretrained", "none"]
N_IMAGES = 300
INDEX_KILLS, MIN_LANDED = 12, 10
EMB_IMAGES, DIM = 3_000, 64  # crossmodal-tiny's embedding size
OTHER_KILLS, MIN_OTHER_LANDED = 8, 6


def crossmodal(*args) -> list[str]:
    return [sys.executable, "-m", "retrieval", *map(str, args)]


def index_command(photos, index):
    # Small batches and a vector-file write every 0.2 s, so kills land in commits and vector-file writes too.
    return crossmodal("index", photos, "--index", index, *MODEL, "--workers", "0", "--batch-size", "4",
                      "--flush-seconds", "0.2", "--no-progress", "--json")


def holds_lock(pid: int, index: Path) -> bool:
    """Whether ``pid`` holds the index's write lock (/proc/locks: "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...")."""
    try:
        inode = (index / ".lock").stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:2] == ["FLOCK"] and fields[4] == str(pid) and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def working_seconds(command, index: Path) -> float:
    """How long an uninterrupted run of ``command`` works: how long it holds the index's write lock (not until
    its exit: tearing down an interpreter that loaded torch takes over a second, and kills there land nowhere)."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=ENV)
        while process.poll() is None and not holds_lock(process.pid, index):
            time.sleep(0.002)
        started = time.monotonic()
        while process.poll() is None and holds_lock(process.pid, index):
            time.sleep(0.002)
        held = time.monotonic() - started
        process.wait()
        output.seek(0)
        assert process.returncode == 0, output.read().decode()
    return held


def kill_while_working(command, index: Path, delay: float) -> bool:
    """Run ``command``; ``delay`` seconds after it takes the index's write lock, SIGKILL it if it still holds
    the lock. Returns whether it did (the kill landed); a run that got done first must succeed."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
        while process.poll() is None and not holds_lock(process.pid, index):
            time.sleep(0.002)
        time.sleep(delay)
        landed = process.poll() is None and holds_lock(process.pid, index)
        if landed:
            process.send_signal(signal.SIGKILL)
        process.wait()  # one that let go of the lock is done with the index: let it exit
        stderr.seek(0)
        assert landed or process.returncode == 0, stderr.read().decode()
    return landed


def timeline(rng, duration: float, kills: int, start: float = 0.03, end: float = 0.93) -> list[float]:
    """Seeded kill points spread over ``duration``: one at random in each of ``kills`` equal slices."""
    width = (end - start) / kills
    return [duration * (start + width * (k + rng.uniform(0, 1))) for k in range(kills)]


# -- crossmodal index over photos --------------------------------------------------------------------------------

def png_with_id(png: bytes, number: int) -> bytes:
    """The same pixels in a file of its own: a tEXt chunk before IEND (PNG encoding is what makes noise slow)."""
    data = b"id\x00" + str(number).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:-12] + chunk + png[-12:]


def make_photos(root: Path) -> None:
    """~1000x800 photos with noise, so decoding and hashing take time: a third PNG, the rest JPEG."""
    noise = np.random.default_rng(0).integers(0, 64, (864, 1064, 3), dtype=np.uint8)

    def picture(i: int) -> Image.Image:
        blocks = np.random.default_rng(i).integers(0, 192, (4, 5, 3), dtype=np.uint8)
        dy, dx = i * 7 % 64, i * 13 % 64
        return Image.fromarray(blocks.repeat(200, 0).repeat(200, 1) + noise[dy:dy + 800, dx:dx + 1000])

    pngs = []
    for i in range(8):
        buffer = io.BytesIO()
        picture(1000 + i).save(buffer, format="PNG", compress_level=1)
        pngs.append(buffer.getvalue())
    for i in range(N_IMAGES):
        path = root / f"d{i % 7}" / f"p{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            path.write_bytes(png_with_id(pngs[i % len(pngs)], i))
        else:
            picture(i).save(path, quality=85)
        if i % 4 == 0:
            path.with_suffix(".txt").write_text(f"caption of picture {i}\nanother line {i}\n")


def committed_images(index) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM items JOIN vectors ON vectors.item_id = items.id "
                              "WHERE items.kind = 'image'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def snapshot(index):
    """modality -> [((path, text), vector)] as the catalog holds them, in id order."""
    with IndexStore.open(index) as store:
        out = {}
        for modality in ("image", "text"):
            ids = store.catalog.vector_ids(modality)
            items = store.catalog.items(ids.tolist())
            vectors = store.fetch_vectors(ids)
            out[modality] = [((items[i].path, items[i].text), v) for i, v in zip(ids.tolist(), vectors)]
        return out


def assert_same_index(got, want) -> None:
    got, want = snapshot(got), snapshot(want)
    for modality in ("image", "text"):
        assert sorted(k for k, _ in got[modality]) == sorted(k for k, _ in want[modality]), modality  # none twice
        held = dict(got[modality])
        for key, vector in want[modality]:
            np.testing.assert_allclose(held[key], vector, atol=1e-5)


def check_consistent(index, damaged: dict[str, bytes] | None = None) -> int:
    """What a kill left opens, and each vector file holds catalog vectors only, each once, or is stale (another
    kind: an interrupted reindex) or one of the ``damaged`` files the test made. Returns images with vectors."""
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
                try:
                    on_disk = VectorStore.load(path, store.spec, store.meta.embed_dim).ids()
                except StaleVectorFile:
                    on_disk = None
                except VectorFileError:
                    assert path.read_bytes() == (damaged or {}).get(path.name), f"a kill damaged {path.name}"
                    on_disk = None
                if on_disk is not None:
                    assert len(np.unique(on_disk)) == len(on_disk), "an id twice in a vector file"
                    assert np.isin(on_disk, expected).all(), "a vector file holds what the catalog does not"
            held, _ = store.load_vectors(modality)
            assert sorted(held.ids().tolist()) == expected.tolist()
        return len(store.catalog.vector_ids("image"))


def assert_files_match_catalog(index) -> None:
    """Vector files of the catalog's kind, holding exactly its vectors (an uninterrupted end state)."""
    with IndexStore.open(index) as store:
        for modality in ("image", "text"):
            held = VectorStore.load(store.vector_path(modality), store.spec, store.meta.embed_dim)
            assert sorted(held.ids().tolist()) == store.catalog.vector_ids(modality).tolist(), modality
    assert verify(index, check_files=False).ok


def test_sigkill_while_indexing_then_resume_matches_an_uninterrupted_run(tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos)
    duration = working_seconds(index_command(photos, tmp_path / "ref"), tmp_path / "ref")

    index = tmp_path / "idx"
    rng = np.random.default_rng(2026)
    points = timeline(rng, duration, INDEX_KILLS)
    committed, landed = 0, 0
    for point in points:
        # Where the resumed run starts on the uninterrupted run's timeline: what it has committed.
        delay = max(0.02, point - duration * committed / N_IMAGES)
        landed += kill_while_working(index_command(photos, index), index, delay)
        now = check_consistent(index)
        assert now >= committed  # what was committed survives
        committed = now
    print(f"crossmodal index: {landed} of {len(points)} kills landed while it worked "
          f"(uninterrupted run {duration:.1f} s, {committed} of {N_IMAGES} images committed before the last)")
    assert landed >= MIN_LANDED and committed < N_IMAGES, "the kills should land mid-run"

    final = subprocess.run(index_command(photos, index), capture_output=True, text=True, env=ENV)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["encoded_images"] == N_IMAGES - committed  # committed work is not redone
    assert check_consistent(index) == N_IMAGES
    assert_same_index(index, tmp_path / "ref")
    assert_files_match_catalog(index)


def test_ctrl_c_stops_after_the_batch_in_hand_and_says_how_to_resume(tmp_path):
    photos, index, n = tmp_path / "photos", tmp_path / "idx", 160
    for i in range(n):
        make_image(photos / f"p{i:03d}.png", seed=i)
    process = subprocess.Popen(index_command(photos, index), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    while process.poll() is None and committed_images(index) < 20:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "stopping after this batch" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    committed = check_consistent(index)
    assert 20 <= committed < n
    final = subprocess.run(index_command(photos, index), capture_output=True, text=True, env=ENV)
    assert json.loads(final.stdout)["encoded_images"] == n - committed


# -- imported embeddings, reindex, verify --repair ---------------------------------------------------------------

def write_embeddings(out: Path, n_images: int = EMB_IMAGES) -> None:
    """clip-retrieval's layout, two shards: every image one caption, every other image a second one."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, DIM))
    images = centres[rng.integers(0, 40, n_images)] + rng.standard_normal((n_images, DIM)) * 0.5
    rows = [(i, f"caption {i}") for i in range(n_images)] + [(i, f"more on {i}") for i in range(0, n_images, 2)]
    image_rows = images[[i for i, _ in rows]]
    text_rows = image_rows + rng.standard_normal(image_rows.shape) * 0.4
    for name in ("img_emb", "text_emb", "metadata"):
        (out / name).mkdir(parents=True, exist_ok=True)
    for shard, part in enumerate(np.array_split(np.arange(len(rows)), 2)):
        np.save(out / "img_emb" / f"img_emb_{shard}.npy", image_rows[part].astype(np.float32))
        np.save(out / "text_emb" / f"text_emb_{shard}.npy", text_rows[part].astype(np.float32))
        (out / "metadata" / f"metadata_{shard}.jsonl").write_text("".join(
            json.dumps({"image_path": f"img/{rows[r][0]}.jpg", "caption": rows[r][1]}) + "\n" for r in part))


def import_command(source, index):
    return crossmodal("index", "--embeddings", source, "--index", index, *MODEL, "--json")


def committed_items(index) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM vectors").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(embeddings folder, an index imported from it uninterrupted, the seconds that import worked)."""
    root = tmp_path_factory.mktemp("embeddings")
    write_embeddings(root / "emb")
    seconds = working_seconds(import_command(root / "emb", root / "ref"), root / "ref")
    return root / "emb", root / "ref", seconds


def test_sigkill_while_importing_embeddings_then_resume_matches_an_uninterrupted_import(imported, tmp_path):
    source, reference, duration = imported
    total = committed_items(reference)
    index = tmp_path / "idx"
    rng = np.random.default_rng(11)
    landed = mid_import = 0
    for point in timeline(rng, duration, OTHER_KILLS):
        # Rows are committed 10,000 at a time: a kill inside a chunk loses it, and the rerun starts it again.
        done = committed_items(index)
        delay = max(0.02, point - duration * done / total)
        hit = kill_while_working(import_command(source, index), index, delay)
        landed, mid_import = landed + hit, mid_import + (hit and done < total)
        check_consistent(index)
    print(f"crossmodal index --embeddings: {landed} of {OTHER_KILLS} kills landed while it worked, {mid_import} "
          f"before all rows were committed (uninterrupted import {duration:.1f} s, {total:,} rows)")
    assert landed >= MIN_OTHER_LANDED and mid_import >= MIN_OTHER_LANDED // 2

    final = subprocess.run(import_command(source, index), capture_output=True, text=True, env=ENV)
    assert final.returncode == 0, final.stderr
    assert_same_index(index, reference)
    assert_files_match_catalog(index)


def reindex_command(index):
    return crossmodal("reindex", "--index", index, "--index-type", "ivf", "--target-recall", "0.9", "--json")


def spec_of(index) -> dict:
    with IndexStore.open(index) as store:
        return json.loads(store.meta.index_spec)


def test_sigkill_while_reindexing_then_rerun_matches_an_uninterrupted_reindex(imported, tmp_path):
    _, source, _ = imported
    for copy in ("ref", "idx", "scratch"):
        shutil.copytree(source, tmp_path / copy)
    # A reindex this small works for about half a second, and one run in three is 30% faster than another
    # even on an idle machine: kill points are spread over the faster of two runs.
    duration = min(working_seconds(reindex_command(tmp_path / name), tmp_path / name) for name in ("ref", "scratch"))
    index = tmp_path / "idx"
    rng = np.random.default_rng(12)
    landed = 0
    for point in timeline(rng, duration, OTHER_KILLS, end=0.7):  # nothing carries over: each run starts afresh
        landed += kill_while_working(reindex_command(index), index, point)
        check_consistent(index)
        assert spec_of(index)["kind"] in ("flat", "ivf")
    print(f"crossmodal reindex: {landed} of {OTHER_KILLS} kills landed while it worked "
          f"(uninterrupted reindex {duration:.1f} s)")
    assert landed >= MIN_OTHER_LANDED

    final = subprocess.run(reindex_command(index), capture_output=True, text=True, env=ENV)
    assert final.returncode == 0, final.stderr
    assert spec_of(index) == spec_of(tmp_path / "ref")  # training and tuning are seeded: the same nprobe
    assert_same_index(index, tmp_path / "ref")
    assert_files_match_catalog(index)


def repair_command(index):
    return crossmodal("verify", "--repair", "--no-files", "--index", index, "--json")


def damage_vector_files(index) -> dict[str, bytes]:
    """image.faiss deleted, text.faiss cut to half; returns the damaged files' bytes."""
    (index / "image.faiss").unlink()
    text = index / "text.faiss"
    text.write_bytes(text.read_bytes()[:text.stat().st_size // 2])
    return {"text.faiss": text.read_bytes()}


def repaired_share(index) -> float:
    """The share of the catalog's vectors that are in sound vector files again (what a resumed repair skips)."""
    with IndexStore.open(index) as store:
        done = total = 0
        for modality in ("image", "text"):
            expected = store.catalog.vector_ids(modality)
            total += len(expected)
            try:
                held = VectorStore.load(store.vector_path(modality), store.spec, store.meta.embed_dim).ids()
            except CrossmodalError:  # missing, damaged, or of another kind
                continue
            done += len(expected) if sorted(held.tolist()) == expected.tolist() else 0
        return done / total


def test_sigkill_while_repairing_then_rerun_matches_an_uninterrupted_repair(imported, tmp_path):
    _, source, _ = imported
    base = tmp_path / "base"
    shutil.copytree(source, base)
    hnsw = subprocess.run(crossmodal("reindex", "--index", base, "--index-type", "hnsw"), capture_output=True, env=ENV)
    assert hnsw.returncode == 0  # a graph to rebuild: the slowest kind to repair
    shutil.copytree(base, tmp_path / "ref")
    damage_vector_files(tmp_path / "ref")
    duration = working_seconds(repair_command(tmp_path / "ref"), tmp_path / "ref")

    index = tmp_path / "idx"
    shutil.copytree(base, index)
    damaged = damage_vector_files(index)
    rng = np.random.default_rng(13)
    landed = 0
    for point in timeline(rng, duration, OTHER_KILLS, end=0.9):
        # A rerun rebuilds only the files still broken: start it where the uninterrupted run would be.
        delay = max(0.02, point - duration * repaired_share(index))
        landed += kill_while_working(repair_command(index), index, delay)
        check_consistent(index, damaged)
    print(f"crossmodal verify --repair: {landed} of {OTHER_KILLS} kills landed while it worked "
          f"(uninterrupted repair {duration:.1f} s)")
    assert landed >= MIN_OTHER_LANDED

    final = subprocess.run(repair_command(index), capture_output=True, text=True, env=ENV)
    assert final.returncode == 0, final.stdout + final.stderr
    assert spec_of(index) == spec_of(tmp_path / "ref") == spec_of(base)
    assert_same_index(index, tmp_path / "ref")
    assert_same_index(index, base)  # repairing changes nothing in the catalog
    assert_files_match_catalog(index)
