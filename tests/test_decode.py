"""Decoding: draft mode stays close to open_clip's own preprocessing; odd images come out as RGB."""

import io
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import make_image
from PIL import Image

from indexer import decode, decoders
from indexer.decode import DRAFT_FACTOR, Decoded, DecodeTask, decode_file, open_image
from indexer.decoders import iter_decoded


def photo_like_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(base).astype(np.int16) + rng.integers(-20, 20, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(4032, 3024), (1920, 1080), (3024, 4032)])
def test_draft_decode_matches_open_clip_preprocessing(size):
    data = photo_like_jpeg(*size)
    preprocess = open_clip.image_transform(224, is_train=False)
    reference = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    drafted = open_image(io.BytesIO(data), 224 * DRAFT_FACTOR)
    assert drafted.size[0] < size[0]  # the draft really decoded at reduced size
    assert drafted.info["source_size"] == size
    diff = (preprocess(drafted) - reference).abs()
    # Normalised units (1.0 is about 70 grey levels): a mean under 0.02 is under 1.5 grey levels.
    assert diff.mean() < 0.02 and diff.max() < 0.15


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), "red")
    image.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    opened = open_image(path)
    assert opened.size == (40, 60) and opened.info["source_size"] == (40, 60)
    top = np.asarray(opened)[2, 20]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize("make", [
    lambda p: Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(p.with_suffix(".jpg")) or p.with_suffix(".jpg"),
    lambda p: Image.new("L", (20, 10), 128).save(p.with_suffix(".png")) or p.with_suffix(".png"),
    lambda p: Image.new("I;16", (20, 10), 40000).save(p.with_suffix(".png")) or p.with_suffix(".png"),
    lambda p: Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(p.with_suffix(".webp")) or p.with_suffix(".webp"),
    lambda p: Image.new("P", (20, 10), 3).save(p.with_suffix(".gif"), transparency=3) or p.with_suffix(".gif"),
])
def test_unusual_modes_decode_to_rgb(tmp_path, make):
    path = make(tmp_path / "img")
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(open_image(path))[0, 0]
    assert r > 200 and g < 50 and b < 50


def test_decode_file_reports_errors_instead_of_raising(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    result = decode_file(DecodeTask(3, junk), lambda im: im, None)
    assert result.key == 3 and result.pixels is None and "cannot decode image" in result.error
    assert result.sha256 is not None
    missing = decode_file(DecodeTask(4, tmp_path / "gone.jpg"), lambda im: im, None)
    assert "cannot read file" in missing.error


def _write_jpegs(folder, n):
    paths = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        path.write_bytes(photo_like_jpeg(64 + 8 * i, 48, seed=i))
        paths.append(path)
    return paths


def test_workers_yield_every_image_in_order_with_a_small_first_batch(tmp_path):
    preprocess = open_clip.image_transform(32, is_train=False)
    tasks = [DecodeTask(i, p) for i, p in enumerate(_write_jpegs(tmp_path, 11))]
    batches = list(iter_decoded(tasks, preprocess, 32, batch_size=8, workers=2))
    assert [len(b.ok) for b in batches] == [4, 7]  # first batch max(2 * workers, batch // 4)
    keys = [item.key for b in batches for item in b.ok]
    assert keys == list(range(11))
    pixels = torch.cat([b.pixels for b in batches])
    for task, row in zip(tasks, pixels):
        assert torch.equal(row, decode_file(task, preprocess, 32).pixels)


def _policy_probe(task, _preprocess, _draft_size, _max_megapixels):
    # Stands in for decode_file inside the forked workers: reports the scheduling policy it ran under.
    return Decoded(task.key, error=str(os.sched_getscheduler(0)))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or multiprocessing.get_start_method() != "fork",
                    reason="Linux scheduling policies, fork start method")
@pytest.mark.parametrize("starved_after, policy", [(60.0, "SCHED_IDLE"), (0.0, "SCHED_OTHER")])
def test_decoders_run_at_idle_priority_until_starved(tmp_path, monkeypatch, starved_after, policy):
    monkeypatch.setattr(decode, "decode_file", _policy_probe)
    monkeypatch.setattr(decoders, "STARVED_AFTER_S", starved_after)
    tasks = [DecodeTask(i, tmp_path / f"{i}.jpg") for i in range(12)]
    # Two batches of 4 so every worker has asked for work after the flag could be raised.
    policies = [int(item.error) for b in iter_decoded(tasks, None, 32, batch_size=4, workers=1) for item in b.failed]
    assert len(policies) == 12
    # A zero threshold marks the run starved at the first item; items the worker picks up after
    # that decode at normal priority (earlier ones were already prefetched at idle priority).
    assert policies[-1] == getattr(os, policy)


@pytest.mark.parametrize("workers, batch_size, sizes", [(0, 2, [2, 2, 1]), (1, 2, [2, 2, 1]), (2, 3, [3, 2])])
def test_batches_always_fill_up(tmp_path, workers, batch_size, sizes):
    preprocess = open_clip.image_transform(32, is_train=False)
    tasks = [DecodeTask(i, p) for i, p in enumerate(_write_jpegs(tmp_path, sum(sizes)))]
    batches = iter_decoded(tasks, preprocess, 32, batch_size=batch_size, workers=workers)
    assert [len(b.ok) for b in batches] == sizes


class Treacherous:
    """A preprocess step that kills its process on 13-pixel-wide images and hangs on 17-pixel-wide ones."""

    def __call__(self, image):
        if image.width == 13:
            os.kill(os.getpid(), signal.SIGKILL)
        if image.width == 17:
            time.sleep(3600)
        return torch.zeros(3, 4, 4)


def test_a_file_that_crashes_or_hangs_its_decoder_is_skipped_and_the_rest_decoded(tmp_path):
    widths = [20] * 5 + [13] + [20] * 5 + [17] + [20] * 5
    tasks = [DecodeTask(i, make_image(tmp_path / f"{i}.png", seed=i, size=(w, 10))) for i, w in enumerate(widths)]
    batches = list(iter_decoded(tasks, Treacherous(), 8, batch_size=4, workers=2, use_draft=False, timeout=2))
    decoded = [item.key for batch in batches for item in batch.ok]
    failed = {item.key: item.error for batch in batches for item in batch.failed}
    assert decoded == [i for i, w in enumerate(widths) if w == 20]  # all the others, in order
    assert set(failed) == {5, 11}
    assert "decoder crashed" in failed[5] and "took over 2s" in failed[11]


class Quitter:
    """Ends its worker process (an exit, not a signal) on every third file, but decodes fine when alone."""

    def __call__(self, task):
        if task.key % 3 == 0 and Path("/proc/self/comm").read_text().strip() == "cm-decoder":
            os._exit(3)
        return Decoded(task.key, sha256=str(task.key), width=1, height=1, pixels=torch.full((3, 2, 2), task.key))


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="process names from /proc (Linux)")
def test_a_worker_that_exits_costs_only_a_retry_of_the_files_it_held(tmp_path):
    tasks = [DecodeTask(i, tmp_path / f"{i}.png") for i in range(20)]
    batches = list(iter_decoded(tasks, None, 8, batch_size=4, workers=2, decoder=Quitter()))
    assert [item.key for b in batches for item in b.ok] == list(range(20))
    assert not [item for b in batches for item in b.failed]
    assert torch.cat([b.pixels for b in batches])[:, 0, 0, 0].tolist() == list(range(20))


def _children() -> set[int]:
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").exists(), reason="child processes from /proc (Linux)")
def test_a_worker_killed_while_the_consumer_is_busy_elsewhere_raises_nothing_there(tmp_path):
    # torch's DataLoader raised from a SIGCHLD handler at whatever line the main process ran when a
    # worker died (a catalog write, the model); the busy loop below is such a line.
    preprocess = open_clip.image_transform(32, is_train=False)
    tasks = [DecodeTask(i, p) for i, p in enumerate(_write_jpegs(tmp_path, 24))]
    before = _children()
    batches = iter_decoded(tasks, preprocess, 32, batch_size=4, workers=2)
    first = next(batches)
    os.kill(min(_children() - before), signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        sum(range(100))
    rest = list(batches)
    assert [item.key for b in [first, *rest] for item in b.ok] == list(range(24))
    assert not [item for b in rest for item in b.failed]


def test_every_failure_names_its_cause(tmp_path):
    """The cause decides when a skipped file is tried again (indexer.skips)."""
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    big = make_image(tmp_path / "big.png", seed=1, size=(200, 100))
    (tmp_path / "folder.jpg").mkdir()  # reading it fails, as a file the indexer may not read does
    causes = {path.name: decode_file(DecodeTask(0, path), lambda im: im, None, max_megapixels=0.01).cause
              for path in (junk, big, tmp_path / "folder.jpg", tmp_path / "gone.jpg")}
    assert causes == {"junk.jpg": "undecodable", "big.png": "too_large", "folder.jpg": "unreadable",
                      "gone.jpg": "vanished"}
    # The crash gets a long timeout so a busy machine cannot make it look like a hang.
    for width, timeout, cause in ((13, 60, "crashed"), (17, 1, "timeout")):
        task = DecodeTask(0, make_image(tmp_path / f"{width}.png", seed=width, size=(width, 10)))
        batches = iter_decoded([task], Treacherous(), 8, batch_size=1, workers=1, use_draft=False, timeout=timeout)
        assert [item.cause for batch in batches for item in batch.failed] == [cause]
