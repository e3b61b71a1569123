"""Reading image files: deep images scaled by their range, stable messages, our pixel bound before
Pillow's, library chatter captured per file, and every picture format we index."""

import importlib.util
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from indexer import imageio
from indexer.decode import DecodeTask, decode_file
from indexer.imageio import MAX_WARNINGS, NotAnImage, TooLarge, capture_native_output, library_output, open_image
from indexer.sources import IMAGE_EXTENSIONS


def as_array(image):
    return np.asarray(image)


def decoded_pixels(path, max_megapixels=100.0):
    result = decode_file(DecodeTask(0, path), as_array, None, max_megapixels)
    assert result.error is None, result.error
    return result.pixels


def png(width, height, bit_depth, colour_type, rows=(), extra=b""):
    """A PNG written chunk by chunk, for what Pillow cannot save (or a header with next to no pixels)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows) or b"\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -- deep images ---------------------------------------------------------------------------------
# Each case: 256 levels k = 0..255 written as low + k * step; scaled by the image's own range they
# must come back as exactly k, gray (R = G = B).
LEVELS = np.arange(256).reshape(16, 16)


def tiff_of(values, mode=None, **save):
    def write(path):
        image = Image.fromarray(values) if mode is None else Image.frombytes(mode, values.shape[::-1], values.tobytes())
        image.save(path, format="TIFF", **save)
    return write


def png_16bit_gray(values, **save):
    def write(path):
        Image.fromarray(values.astype(np.uint16)).save(path, format="PNG", **save)
    return write


DEEP = {
    "I;16 tiff": (tiff_of((1000 + 3 * LEVELS).astype(np.uint16)), "I;16"),
    "I;16 tiff deflate": (tiff_of((1000 + 3 * LEVELS).astype(np.uint16), compression="tiff_adobe_deflate"), "I;16"),
    "I;16B tiff": (tiff_of((500 + 250 * LEVELS).astype(">u2"), mode="I;16B"), "I;16B"),
    "12 bits in 16": (tiff_of((16 * LEVELS).astype(np.uint16)), "I;16"),
    "signed 16-bit tiff (I;16S)": (tiff_of((-30000 + 200 * LEVELS).astype("<i2"), mode="I;16", tiffinfo={339: 2}),
                                   "I"),
    "16-bit gray png": (png_16bit_gray(40 + 7 * LEVELS), "I;16"),
    "16-bit gray png with a transparent level": (png_16bit_gray(40 + 7 * LEVELS, transparency=40), "I;16"),
    "32-bit int tiff": (tiff_of((-10**6 + 10**6 * LEVELS).astype(np.int32)), "I"),
    "32-bit float tiff": (tiff_of((-0.5 + LEVELS / 255 * 2).astype(np.float32)), "F"),
}


@pytest.mark.parametrize("reader", ["open_image", "decode_file"])
@pytest.mark.parametrize("case", DEEP)
def test_deep_images_are_scaled_by_their_own_range_and_stay_gray(tmp_path, case, reader):
    write, mode = DEEP[case]
    path = tmp_path / "deep.tif"
    write(path)
    assert Image.open(path).mode == mode  # the case really is what its name says
    pixels = np.asarray(open_image(path)) if reader == "open_image" else decoded_pixels(path)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.array_equal(pixels[..., 0], LEVELS)


def test_float_images_ignore_nan_and_inf_for_their_range(tmp_path):
    values = np.array([[np.nan, np.inf, -np.inf, 0.25, 0.5, 0.75]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert np.asarray(open_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 255, 0, 0, 128, 255]


def test_constant_deep_images_use_their_nominal_range(tmp_path):
    cases = [("F", 0.5, 128), ("F", 7.0, 255), ("F", float("nan"), 0), ("I;16", 0, 0), ("I;16", 65535, 255),
             ("I;16", 40000, 156), ("I", -5, 0)]
    for i, (mode, value, expected) in enumerate(cases):
        Image.new(mode, (5, 4), value).save(tmp_path / f"{i}.tif")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no division by zero, no invalid-value warning from numpy
            pixels = np.asarray(open_image(tmp_path / f"{i}.tif"))
        assert (pixels == expected).all(), (mode, value, pixels[0, 0])


def test_gray_tiff_with_premultiplied_alpha_comes_out_gray(tmp_path):
    buffer = io.BytesIO()
    Image.new("LA", (4, 4), (100, 128)).save(buffer, format="TIFF")
    # ExtraSamples 1 (associated alpha) instead of Pillow's 2 makes the file open as "La".
    data = buffer.getvalue().replace(struct.pack("<HHIH", 338, 3, 1, 2), struct.pack("<HHIH", 338, 3, 1, 1))
    (tmp_path / "la.tif").write_bytes(data)
    assert Image.open(tmp_path / "la.tif").mode == "La"
    assert (np.asarray(open_image(tmp_path / "la.tif")) == 199).all()  # 100 un-premultiplied by alpha 128/255


def test_a_rotated_tiff_records_the_size_it_is_shown_at(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.new("L", (40, 30), 90).save(tmp_path / "rotated.tif", exif=exif, compression="tiff_adobe_deflate")
    opened = open_image(tmp_path / "rotated.tif")
    assert opened.size == opened.info["source_size"] == (30, 40)  # Pillow reports a TIFF's size already rotated


# -- messages --------------------------------------------------------------------------------------
def test_a_file_that_is_no_image_gets_a_stable_message(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    first = decode_file(DecodeTask(0, path), as_array, None).error
    assert first == "cannot decode image: not a recognised image format (named .png, but the contents are no " \
                    "image we can read)"
    assert decode_file(DecodeTask(0, path), as_array, None).error == first
    with pytest.raises(NotAnImage, match="not a recognised image format"):
        open_image(io.BytesIO(b"hello"))


def test_our_bound_is_checked_before_pillows_and_says_how_to_raise_it(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png(20_000, 10_000, 8, 0))  # 200 MP by its header: past Pillow's own error at ~179 MP
    error = decode_file(DecodeTask(0, path), as_array, None).error
    assert error == ("image too large: 20000x10000 is 200 megapixels, over --max-megapixels 100; "
                     "raise --max-megapixels to index it")
    with pytest.raises(TooLarge) as raised:
        open_image(path)
    assert (raised.value.megapixels, raised.value.max_megapixels) == (200, 100)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_with_our_bound_pillows_limit_never_fires(tmp_path, monkeypatch, fmt):
    # Pillow's limit lowered so that a 50x50 image is over twice it (its error) and 40x40 over it (its
    # warning), as 200 MP and 100 MP images are for the real one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (50, 40):
        Image.new("RGB", (side, side), (10, 200, 30)).save(tmp_path / f"{side}.img", format=fmt)
        result = decode_file(DecodeTask(0, tmp_path / f"{side}.img"), as_array, None, max_megapixels=0.01)
        assert result.error is None and result.warnings == []
        assert tuple(result.pixels[0, 0]) == (10, 200, 30)
    refused = decode_file(DecodeTask(0, tmp_path / "50.img"), as_array, None, max_megapixels=0.002).error
    assert refused.startswith("image too large: 50x50 is 0.0025 megapixels, over --max-megapixels 0.002")
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back


def test_special_files_are_refused_without_reading_them():
    result = decode_file(DecodeTask(0, Path(os.devnull)), as_array, None)
    assert result.error == "cannot read file: it is a character device, not a regular file"


# -- library output --------------------------------------------------------------------------------
def jpeg_with_corrupt_exif(path):
    # One EXIF tag whose data lies past the end of the block: Pillow warns "Tag data larger than file".
    ifd = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 100, 5000) + struct.pack("<I", 0)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, format="JPEG", exif=b"Exif\x00\x00" + ifd)
    return path


def truncated_deflate_tiff(path):
    # libtiff's ZIP decoder reports the cut-off strip by writing to fd 2 itself.
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(
        buffer, format="TIFF", compression="tiff_adobe_deflate")
    data = buffer.getvalue()
    tags = Image.open(io.BytesIO(data)).tag_v2
    offset, length = tags[273][0], tags[279][0]  # the (only) strip
    path.write_bytes(data[:offset + 40] + bytes(length - 40) + data[offset + length:])
    return path


@pytest.fixture
def decoder_process():
    """This test process acts as a decoder process: fd 2 may be taken around each decode."""
    capture_native_output(True)
    yield
    capture_native_output(False)


def test_outside_decoder_processes_fd_2_is_left_alone(capfd):
    # The Ctrl-C notice printed while --workers 0 decodes in the main process must reach the user.
    with library_output() as said:
        os.write(2, b"stopping after this batch\n")
    assert said.lines == [] and capfd.readouterr().err == "stopping after this batch\n"


def test_python_warnings_of_a_file_are_kept_with_it_not_printed(tmp_path, capfd):
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        result = decode_file(DecodeTask(0, jpeg_with_corrupt_exif(tmp_path / "exif.jpg")), as_array, None)
    assert result.error is None
    assert result.warnings == ["Tag data larger than file. Skipping tag 270"]
    assert escaped == [] and capfd.readouterr().err == ""


def test_what_libtiff_writes_to_fd_2_is_kept_with_the_file(tmp_path, capfd, decoder_process):
    result = decode_file(DecodeTask(0, truncated_deflate_tiff(tmp_path / "cut.tif")), as_array, None)
    assert result.error is not None and result.error.startswith("cannot decode image")
    assert any(line.startswith("ZIPDecode:") for line in result.warnings), result.warnings
    os.write(2, b"ours\n")  # fd 2 is back where it was
    assert capfd.readouterr().err == "ours\n"


def test_fd_2_is_restored_when_the_block_raises(capfd, decoder_process):
    with pytest.raises(RuntimeError), library_output() as said:
        os.write(2, b"from C\n")
        raise RuntimeError
    os.write(2, b"after\n")
    assert said.lines == ["from C"] and capfd.readouterr().err == "after\n"


def test_warnings_are_deduplicated_and_capped():
    with library_output() as said:
        for i in range(MAX_WARNINGS + 10):
            warnings.warn(f"  warning {i}  ", UserWarning, stacklevel=1)
        warnings.warn("warning 0", UserWarning, stacklevel=1)
    lines = said.capped()
    assert lines[:2] == ["warning 0", "warning 1"] and len(lines) == MAX_WARNINGS + 1
    assert lines[-1] == "... 10 more"


# -- formats -----------------------------------------------------------------------------------------
BLOCKS = np.array([[[200, 30, 30], [30, 200, 30]], [[30, 30, 200], [220, 220, 40]]], np.uint8)
SOURCE = Image.fromarray(np.kron(BLOCKS, np.ones((16, 16, 1), np.uint8)))  # four 16x16 colour blocks


def psd(image, path):
    """An RGB Photoshop file, no layers: the merged image, raw and planar (Pillow reads PSD, cannot write it)."""
    planes = np.asarray(image).transpose(2, 0, 1)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, image.height, image.width, 8, 3)
    path.write_bytes(header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + planes.tobytes())


FORMATS = {
    ".jp2": lambda p: SOURCE.save(p, format="JPEG2000"),
    ".j2k": lambda p: SOURCE.save(p, format="JPEG2000"),
    ".jpx": lambda p: SOURCE.save(p, format="JPEG2000"),
    ".ppm": lambda p: SOURCE.save(p, format="PPM"),
    ".pgm": lambda p: SOURCE.convert("L").save(p, format="PPM"),
    ".pbm": lambda p: SOURCE.convert("L").point(lambda v: 255 * (v > 100)).convert("1").save(p, format="PPM"),
    ".pnm": lambda p: SOURCE.save(p, format="PPM"),
    ".tga": lambda p: SOURCE.save(p, format="TGA"),
    ".ico": lambda p: SOURCE.save(p, format="ICO", sizes=[(32, 32)]),
    ".psd": lambda p: psd(SOURCE, p),
    ".heic": lambda p: pillow_heif.from_pillow(SOURCE).save(p, quality=95),
    ".heif": lambda p: pillow_heif.from_pillow(SOURCE).save(p, quality=95),
    ".avif": lambda p: SOURCE.save(p, format="AVIF", quality=95),
}


@pytest.mark.parametrize("suffix", FORMATS)
def test_picture_formats_are_indexed_and_decode_to_their_colours(tmp_path, suffix):
    assert suffix in IMAGE_EXTENSIONS
    path = tmp_path / f"picture{suffix}"
    FORMATS[suffix](path)
    pixels = decoded_pixels(path).astype(int)
    reference = SOURCE
    if suffix in (".pgm", ".pbm"):
        reference = Image.open(path).convert("RGB")  # the gray / bilevel image the file holds
    assert pixels.shape == (32, 32, 3)
    # Block centres: lossy codecs (AVIF, HEIC subsample colour) blur the edges between blocks.
    centres = np.s_[4:12, 4:12], np.s_[4:12, 20:28], np.s_[20:28, 4:12], np.s_[20:28, 20:28]
    for block in centres:
        expected = np.asarray(reference, dtype=int)[block].mean(axis=(0, 1))
        assert np.abs(pixels[block].mean(axis=(0, 1)) - expected).max() < 6, (block, pixels[block][0, 0])


def test_pillow_heif_is_loaded_only_when_a_heif_file_needs_it(tmp_path):
    SOURCE.save(tmp_path / "a.png")
    FORMATS[".heic"](tmp_path / "b.heic")
    # imageio.py in a fresh interpreter (indexer's own imports are lazy: no torch comes with it).
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(imageio.__file__).parent.parent)!r})
import indexer.imageio as module
module.open_image(Path({str(tmp_path / 'a.png')!r}))
print("pillow_heif" in sys.modules, end=" ")
print(module.open_image(Path({str(tmp_path / 'b.heic')!r})).getpixel((4, 4)), end=" ")
print("pillow_heif" in sys.modules)
"""
    assert importlib.util.find_spec("pillow_heif") is not None
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and out[-1] == "True"
