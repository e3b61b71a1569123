"""Image files as the CLI meets them: library warnings per file, query images that are special files
or too large (fake encoder, real pipeline and catalog)."""

import json
import os
import threading

import pytest
from conftest import make_image
from test_imageio import jpeg_with_corrupt_exif, png, truncated_deflate_tiff

from indexer.catalog import Catalog


@pytest.fixture
def warned_dir(tmp_path):
    root = tmp_path / "pictures"
    make_image(root / "plain.png", seed=1)
    jpeg_with_corrupt_exif(root / "exif.jpg")  # indexed, with a Python warning from Pillow
    truncated_deflate_tiff(root / "cut.tif")  # skipped, with what libtiff wrote to fd 2
    return root.resolve()


def test_library_warnings_are_kept_per_file_and_summed_up_in_one_line(invoke, warned_dir, tmp_path, capfd):
    out = invoke("index", warned_dir, "--workers", "1", "--no-progress", ok=True).output
    assert "  2 files had library warnings (see --verbose, or crossmodal info --warnings)" in out
    assert "Tag data" not in out and "ZIPDecode" not in out
    assert "Tag data" not in capfd.readouterr().err

    catalog = Catalog(tmp_path / "idx" / "catalog.sqlite")
    stored = {os.path.basename(v.path): v.warnings for v in catalog.images()}
    catalog.close()
    assert stored["plain.png"] is None
    assert stored["exif.jpg"] == "Tag data larger than file. Skipping tag 270"
    assert stored["cut.tif"].startswith("ZIPDecode:")  # a skipped file keeps its warnings too

    listed = invoke("info", "--warnings", ok=True).output
    assert f"warnings: {warned_dir / 'exif.jpg'}\n      Tag data larger than file. Skipping tag 270\n" in listed
    assert f"warnings: {warned_dir / 'cut.tif'}\n      ZIPDecode:" in listed


def test_verbose_lists_each_warned_file_also_from_decoder_processes(invoke, warned_dir, tmp_path, capfd):
    out = invoke("index", warned_dir, "--workers", "1", "--no-progress", "--verbose", ok=True).output
    assert "library warnings (2 files):\n" in out
    assert f"\n  {warned_dir / 'exif.jpg'}\n      Tag data larger than file. Skipping tag 270\n" in out
    assert f"\n  {warned_dir / 'cut.tif'}\n      ZIPDecode:" in out
    assert "ZIPDecode" not in capfd.readouterr().err  # the decoder process's fd 2 was captured too
    summary = json.loads(invoke("index", warned_dir, "--index", tmp_path / "other", "--workers", "0",
                                "--no-progress", "--json", ok=True).output)
    # In the main process (--workers 0) only Python warnings are collected: fd 2 stays the user's.
    assert set(summary["warned"]) == {str(warned_dir / "exif.jpg")}


def test_a_fifo_as_query_image_is_refused_at_once(invoke, photo_dir, tmp_path):
    invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True)
    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)
    results = []
    search = threading.Thread(target=lambda: results.append(invoke("search", "--image", fifo)), daemon=True)
    search.start()
    search.join(timeout=30)
    if search.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer that leaves: the blocked read gets EOF
        search.join(timeout=10)
        pytest.fail("search --image on a FIFO hung")
    assert results[0].exit_code == 1
    assert results[0].output.strip().splitlines() == [
        f"Error: cannot read query image {fifo}: it is a FIFO (named pipe), not a regular file"]


def test_a_query_image_over_the_limit_is_refused_without_mentioning_an_option(invoke, photo_dir, tmp_path):
    invoke("index", photo_dir, "--workers", "0", "--no-progress", ok=True)
    big = tmp_path / "big.png"
    big.write_bytes(png(12_000, 10_000, 8, 2))  # 120 MP by its header; refused before any pixel is decoded
    result = invoke("search", "--image", big)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: cannot read query image {big}: 12000x10000 is 120 megapixels, "
                                     "over the 100-megapixel limit for query images")
