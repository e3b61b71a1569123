"""JPEGs decoded in batches on the model's device (indexer.devicedecode), run here on the CPU device:
the same pixels as the CPU path's full decode, every EXIF orientation, and whatever the device path
does not take handed to the CPU decoders with the CPU path's own outcome."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import FakePreprocess, make_image
from PIL import Image

from indexer.decode import DecodeTask
from indexer.decoders import iter_decoded
from indexer.devicedecode import DeviceTransform, iter_decoded_on_device
from indexer.encoder import load_encoder
from indexer.errors import CrossmodalError
from indexer.pipeline import IndexOptions, update_index
from indexer.store import IndexStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from index_throughput import photo_like  # noqa: E402

CPU = torch.device("cpu")
# Normalised units (std ~0.27): one grey level is ~0.015. The CPU path's own draft decode differs
# from its full decode by up to ~0.17.
PIXEL_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("crossmodal-tiny", "none", "cpu", "fp32")


def cpu_path(encoder, draft: bool = False):
    return lambda tasks: iter_decoded(tasks, encoder.preprocess, encoder.image_size, workers=0, use_draft=draft,
                                      max_megapixels=None)


def decoded(batches) -> dict[int, object]:
    """key -> the Decoded item, with its own row of pixels."""
    out = {}
    for batch in batches:
        for row, item in enumerate(batch.ok):
            item.pixels = batch.pixels[row]
            out[item.key] = item
        for item in batch.failed:
            out[item.key] = item
    return out


def jpeg(path: Path, size: tuple[int, int], seed: int, orientation: int = 1, mode: str = "RGB") -> Path:
    image = Image.open(io.BytesIO(photo_like(*size, np.random.default_rng(seed)))).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90, exif=exif)
    return path


def test_transform_is_read_from_open_clip_and_refused_for_others(encoder) -> None:
    transform = DeviceTransform.of(encoder.preprocess)
    assert transform is not None and transform.size == encoder.image_size and len(transform.mean) == 3
    assert DeviceTransform.of(FakePreprocess()) is None


def test_every_orientation_matches_the_cpu_full_decode(tmp_path, encoder) -> None:
    tasks = [DecodeTask(o, jpeg(tmp_path / f"o{o}.jpg", (320, 200), o, orientation=o)) for o in range(1, 9)]
    device = decoded(iter_decoded_on_device(tasks, encoder.preprocess, CPU, cpu_path(encoder), batch_size=3))
    cpu = decoded(cpu_path(encoder)(tasks))
    for task in tasks:
        a, b = device[task.key], cpu[task.key]
        assert (a.width, a.height, a.sha256) == (b.width, b.height, b.sha256)
        assert a.meta is not None and a.meta == b.meta
        assert (a.pixels - b.pixels).abs().max() < PIXEL_TOLERANCE, task.path.name
    # Orientations 5-8 are turned a quarter: a wide file becomes a tall image.
    assert (device[6].width, device[6].height) == (200, 320)


def test_what_the_device_path_does_not_take_gets_the_cpu_path_outcome(tmp_path, encoder, monkeypatch) -> None:
    files = {
        "wide.jpg": jpeg(tmp_path / "wide.jpg", (640, 360), 1),
        "big.jpg": jpeg(tmp_path / "big.jpg", (1400, 1000), 2),  # over the bound below: TooLarge
        "grey.jpg": jpeg(tmp_path / "grey.jpg", (300, 300), 3, mode="L"),
        "cmyk.jpg": jpeg(tmp_path / "cmyk.jpg", (300, 200), 4, mode="CMYK"),  # not for nvJPEG: the CPU decodes it
        "picture.png": make_image(tmp_path / "picture.png", 5, (120, 90)),
        "device-fails.jpg": jpeg(tmp_path / "device-fails.jpg", (250, 250), 6),
        "not-a-jpeg.jpg": tmp_path / "not-a-jpeg.jpg",
        "missing.jpg": tmp_path / "missing.jpg",
    }
    files["not-a-jpeg.jpg"].write_bytes(b"\xff\xd8\xff\xe0 this is no image")
    fails = len(files["device-fails.jpg"].read_bytes())
    real = torchvision.io.decode_jpeg

    def picky(data, **kwargs):  # the device refuses one file (as nvJPEG refuses what it cannot decode)
        inputs = data if isinstance(data, list) else [data]
        if any(len(x) == fails for x in inputs):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    tasks = [DecodeTask(i, path) for i, path in enumerate(files.values())]

    def cpu(tasks):
        return iter_decoded(tasks, encoder.preprocess, encoder.image_size, workers=0, use_draft=False,
                            max_megapixels=1.0)

    device = decoded(iter_decoded_on_device(tasks, encoder.preprocess, CPU, cpu, batch_size=4, max_megapixels=1.0))
    reference = decoded(cpu(tasks))
    assert sorted(device) == sorted(reference) == list(range(len(files)))
    for task in tasks:
        a, b = device[task.key], reference[task.key]
        assert (a.error, a.cause, a.sha256) == (b.error, b.cause, b.sha256), task.path.name
        if b.pixels is not None:
            assert (a.pixels - b.pixels).abs().max() < PIXEL_TOLERANCE, task.path.name
    assert reference[1].cause == "too_large" or "too large" in reference[1].error
    assert reference[7].error.startswith("cannot read file")


def test_a_transform_it_cannot_replay_sends_everything_to_the_cpu(tmp_path) -> None:
    tasks = [DecodeTask(0, jpeg(tmp_path / "a.jpg", (100, 80), 1))]
    seen = []

    def cpu(tasks):
        seen.extend(tasks)
        return iter([])

    assert list(iter_decoded_on_device(tasks, FakePreprocess(), CPU, cpu)) == [] and seen == tasks


def test_index_with_device_decoding_equals_cpu_decoding(tmp_path, encoder) -> None:
    root = tmp_path / "photos"
    for i, size in enumerate([(640, 480), (480, 640), (1024, 768), (300, 200)]):
        jpeg(root / f"p{i}.jpg", size, i, orientation=(1, 6, 3, 1)[i])
    make_image(root / "q.png", 9)
    vectors = {}
    for place in ("cpu", "device"):
        options = IndexOptions(workers=0, progress=False, batch_size=2, decode=place, use_draft=False)
        summary = update_index(root, tmp_path / place, encoder, options)
        assert (summary.added, summary.encoded_images, summary.skipped) == (5, 5, 0)
        with IndexStore.open(tmp_path / place) as store:
            items = store.catalog.items(list(range(1, 50))).values()
            by_path = {item.path: item.id for item in items if item.kind == "image"}
            vectors[place] = {path: store.fetch_vectors([i])[0] for path, i in by_path.items()}
    assert vectors["cpu"].keys() == vectors["device"].keys() and len(vectors["cpu"]) == 5
    for path, vector in vectors["cpu"].items():
        assert float(vector @ vectors["device"][path]) > 0.9999, path


def test_unknown_decode_place_is_one_clear_error(tmp_path, encoder) -> None:
    make_image(tmp_path / "r" / "a.png", 1)
    with pytest.raises(CrossmodalError, match="unknown --decode 'gpu': use auto, cpu, device"):
        update_index(tmp_path / "r", tmp_path / "i", encoder, IndexOptions(workers=0, progress=False, decode="gpu"))


def test_a_phone_photo_reduced_fifty_times_matches_the_cpu_path(tmp_path, encoder) -> None:
    """4032x3024 to the tiny model's 64 px: past the scale CUDA's antialiased resize can do in one step,
    so most of it is a box average first; still the CPU path's pixels."""
    tasks = [DecodeTask(0, jpeg(tmp_path / "phone.jpg", (4032, 3024), 11, orientation=6))]
    device = decoded(iter_decoded_on_device(tasks, encoder.preprocess, CPU, cpu_path(encoder)))
    cpu = decoded(cpu_path(encoder)(tasks))
    assert (device[0].width, device[0].height) == (3024, 4032)
    assert (device[0].pixels - cpu[0].pixels).abs().max() < PIXEL_TOLERANCE


def test_failures_inside_the_device_path_fall_back_to_the_cpu(tmp_path, encoder, monkeypatch) -> None:
    """A transform the device cannot run (out of memory, a kernel's limit), and a file that turned into
    a FIFO after the walk: each gets the CPU path's outcome, and the other files still decode."""
    import os

    from indexer import devicedecode

    tasks = [DecodeTask(i, jpeg(tmp_path / f"{i}.jpg", (200 + 40 * i, 150), i)) for i in range(4)]
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    tasks.append(DecodeTask(4, fifo))
    real = devicedecode.DeviceTransform.__call__

    def failing(self, image):
        if image.shape[-1] == 280:  # the third file
            raise RuntimeError("CUDA out of memory")
        return real(self, image)

    monkeypatch.setattr(devicedecode.DeviceTransform, "__call__", failing)
    monkeypatch.setattr(devicedecode, "MAX_BATCH_PIXELS", 1)  # a batch per image: the pixel cap holds
    batches = list(iter_decoded_on_device(tasks, encoder.preprocess, CPU, cpu_path(encoder), batch_size=8))
    assert [len(b.ok) for b in batches[:3]] == [1, 1, 1]
    device = decoded(batches)
    cpu = decoded(cpu_path(encoder)(tasks))
    assert sorted(device) == list(range(5))
    assert device[4].error == cpu[4].error and "FIFO" in device[4].error
    for key in range(4):
        assert (device[key].pixels - cpu[key].pixels).abs().max() < PIXEL_TOLERANCE
