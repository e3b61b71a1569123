"""Decoding: draft mode stays close to open_clip's own preprocessing; odd images come out as RGB."""

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from indexer.decode import DRAFT_FACTOR, DecodeTask, decode_file, open_image


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
