"""A generated folder of hostile and unusual files: each valid image is indexed, everything else is
recorded as skipped with its reason, and the run goes on (fake encoder, real pipeline and catalog)."""

import io
import json
import os
import signal
import socket

import numpy as np
import pytest
from PIL import Image

from indexer.catalog import Catalog


def png_bytes(image, **kw):
    out = io.BytesIO()
    image.save(out, format="PNG", **kw)
    return out.getvalue()


def colourful(size=(64, 48), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "hostile"
    root.mkdir()
    good_jpeg = io.BytesIO()
    colourful(seed=1).save(good_jpeg, format="JPEG")
    valid = {
        "cmyk.jpg": lambda p: colourful(seed=2).convert("CMYK").save(p, format="JPEG"),
        "gray.jpg": lambda p: colourful(seed=3).convert("L").save(p, format="JPEG"),
        "sixteen-bit.png": lambda p: Image.fromarray(
            np.random.default_rng(4).integers(0, 65535, (30, 40), dtype=np.uint16)).save(p),
        "palette-transparent.png": lambda p: colourful(seed=5).convert("P").save(p, transparency=0),
        "rgba.png": lambda p: colourful(seed=6).convert("RGBA").save(p),
        "animated.gif": lambda p: colourful(seed=7).save(p, save_all=True, append_images=[colourful(seed=8)]),
        "animated.webp": lambda p: colourful(seed=9).save(p, save_all=True, append_images=[colourful(seed=10)]),
        "pages.tiff": lambda p: colourful(seed=11).save(p, save_all=True, append_images=[colourful(seed=12)]),
        "one-pixel.png": lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
        "png-named.jpg": lambda p: p.write_bytes(png_bytes(colourful(seed=13))),
        "with space and 'quotes\".jpg": lambda p: p.write_bytes(good_jpeg.getvalue()[:-2] + b"\xff\xd9"),
        "newline\nin name.png": lambda p: colourful(seed=14).save(p, format="PNG"),
        ("x" * 200) + ".png": lambda p: colourful(seed=15).save(p),
        "deep/a/b/c/d/e/f/g/h/nested.png": lambda p: colourful(seed=16).save(p),
    }
    invalid = {
        "truncated.jpg": lambda p: p.write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 3]),
        "zero-bytes.png": lambda p: p.write_bytes(b""),
        "random-bytes.jpg": lambda p: p.write_bytes(os.urandom(2048)),
        "text-file.png": lambda p: p.write_text("this is not an image\n"),
        "too-large.png": lambda p: colourful((400, 400), seed=17).save(p),  # over the test's 0.1 MP bound
    }
    for name, make in {**valid, **invalid}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    not_utf8 = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(not_utf8, "wb") as handle:
        handle.write(png_bytes(colourful(seed=18)))
    os.symlink(root / "deep", root / "deep" / "a" / "loop")  # a folder that contains itself
    os.symlink(root / "rgba.png", root / "link-to-rgba.png")  # followed: the same content, encoded once
    return root, valid, invalid


def test_every_valid_image_is_indexed_and_every_bad_file_skipped_with_its_reason(invoke, hostile, tmp_path):
    root, valid, invalid = hostile
    result = invoke("index", root, "--workers", "0", "--no-progress", "--max-megapixels", "0.1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["added"] == len(valid) + 2  # and the symlink to one of them, and the café file
    assert summary["skipped"] == len(invalid)
    assert summary["encoded_images"] == len(valid) + 1 and summary["duplicates"] == 1  # the link's content: once
    # A name that is not UTF-8 is indexed under an escaped name, with a note; the folder loop is reported.
    assert any("not valid UTF-8" in p for p in summary["problems"])
    assert any("symlink loop" in p for p in summary["problems"])

    catalog = Catalog(tmp_path / "idx" / "catalog.sqlite")
    reasons = {os.path.basename(v.path): v.error for v in catalog.skipped()}
    catalog.close()
    assert set(reasons) == set(invalid)
    assert "image too large" in reasons["too-large.png"] and "--max-megapixels" in reasons["too-large.png"]
    assert all(reason.startswith(("cannot decode image", "image too large")) for reason in reasons.values())

    listed = invoke("info", "--skipped").output
    assert all(f"{name}: " in listed for name in invalid)

    again = json.loads(invoke("index", root, "--workers", "0", "--no-progress", "--max-megapixels", "0.1",
                              "--json").output)
    assert again["added"] == 0 and again["encoded_images"] == 0 and again["skipped"] == len(invalid)
    checked = json.loads(invoke("verify", "--json").output)
    assert checked["ok"] and checked["missing_files"] == []  # escaped names still lead to their files


def test_a_file_that_vanishes_between_walk_and_decode_is_reported_not_recorded(invoke, photo_dir, monkeypatch):
    import indexer.pipeline

    walk = indexer.pipeline.walk_images

    def walk_then_delete(*args, **kwargs):
        files = list(walk(*args, **kwargs))
        (photo_dir / "img2.png").unlink()  # gone after the walk saw it, before it is read
        (photo_dir / "img3.png").write_bytes(b"changed into garbage")  # changed after the walk saw it
        return iter(files)

    with monkeypatch.context() as patch:
        patch.setattr(indexer.pipeline, "walk_images", walk_then_delete)
        summary = json.loads(invoke("index", photo_dir, "--workers", "0", "--no-progress", "--json").output)
    assert summary["added"] == 4 and summary["skipped"] == 1
    assert any("img2.png: vanished before it could be read" in p for p in summary["problems"])
    assert any("img3.png: cannot decode image" in p for p in summary["problems"])
    again = json.loads(invoke("index", photo_dir, "--workers", "0", "--no-progress", "--json").output)
    assert again["removed"] == 0 and again["skipped"] == 1  # never indexed, so not "removed"; the garbage stays


@pytest.fixture
def deadline():
    """Fail instead of hanging: a FIFO opened for reading blocks until someone writes to it."""
    def expired(_signum, _frame):
        raise TimeoutError("the run hung: something opened a FIFO or socket")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifos_sockets_and_links_to_them_are_recorded_as_skipped_never_opened(invoke, photo_dir, monkeypatch,
                                                                              deadline):
    os.mkfifo(photo_dir / "pipe.jpg")
    os.mkfifo(photo_dir / "pipe.log")
    (photo_dir / "sub" / "to-pipe.png").symlink_to(photo_dir / "pipe.jpg")
    monkeypatch.chdir(photo_dir)  # bind a relative name: AF_UNIX paths are limited to about 100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.webp")
        args = ("index", photo_dir, "--workers", "0", "--no-progress", "--json")
        first = json.loads(invoke(*args, ok=True).output)
        again = json.loads(invoke(*args, ok=True).output)
        listed = invoke("info", "--skipped", ok=True).output
    assert (first["added"], first["skipped"], first["special_files"]) == (6, 3, {"FIFO": 1})
    assert sorted(p for p in first["problems"] if "regular" in p) == [
        f"{photo_dir}/pipe.jpg: not a regular file (FIFO); skipped",
        f"{photo_dir}/sock.webp: not a regular file (socket); skipped",
        f"{photo_dir}/sub/to-pipe.png: not a regular file (FIFO); skipped"]
    assert (again["skipped"], again["removed"], again["unchanged"]) == (3, 0, 6)
    assert not any("regular" in p for p in again["problems"])  # recorded once, listed by info --skipped
    assert "sub/to-pipe.png: not a regular file (FIFO); skipped" in listed
    assert "sock.webp: not a regular file (socket); skipped" in listed
