"""Photo metadata from image headers (indexer.photometa): every field, and broken EXIF that must not crash."""

import io
import os
import pickle

import pytest
from conftest import FakePreprocess, make_image
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from indexer.decode import DecodeTask, decode_file
from indexer.imageio import open_image
from indexer.photometa import PhotoMeta, exif_datetime, photo_meta, read_photo_meta
from indexer.synth import stamp_photo_meta

EXIF_IFD, GPS_IFD = 0x8769, 0x8825


def jpeg_with(tmp_path, exif, name="photo.jpg", size=(40, 30)):
    path = make_image(tmp_path / name, seed=1, size=size)
    with Image.open(path) as image:
        image.convert("RGB").save(path, "JPEG", exif=exif, quality=92)
    return path


def gps_exif(lat, lon, lat_ref="N", lon_ref="E", tags=None):
    exif = Image.Exif()
    exif.update(tags or {})
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: lat_ref, 2: lat, 3: lon_ref, 4: lon})
    return exif


def r(numerator, denominator=1):
    return IFDRational(numerator, denominator)


def test_a_camera_jpeg_gives_every_field(tmp_path):
    path = stamp_photo_meta(make_image(tmp_path / "a.jpg", seed=1, fmt="JPEG"), taken_at="2021-07-14T18:03:51",
                            make="Canon\x00\x00", model="  EOS 5D Mark IV ", gps=(-33.85678, 151.21528),
                            orientation=6)
    want = PhotoMeta(format="JPEG", taken_at="2021-07-14T18:03:51", camera_make="Canon",
                     camera_model="EOS 5D Mark IV", orientation=6, gps_lat=-33.85678, gps_lon=151.21528)
    with Image.open(path) as image:
        assert photo_meta(image) == want
        assert image.tile  # read from the header: nothing decoded
    assert read_photo_meta(path) == want
    shown = open_image(path)  # the decode path reads it on the way, before the rotation drops the tag
    assert shown.info["photo_meta"] == want and shown.size == (30, 40)


def test_a_png_without_exif_gives_its_format_and_is_not_decoded(tmp_path):
    path = make_image(tmp_path / "plain.png", seed=2)
    with Image.open(path) as image:
        assert photo_meta(image) == PhotoMeta(format="PNG")
        assert image.tile  # PNG's getexif() would have decoded it to look for a late eXIf chunk
    assert read_photo_meta(path) == PhotoMeta(format="PNG")
    assert open_image(path).info["photo_meta"] == PhotoMeta(format="PNG")


def test_png_and_webp_exif_are_read(tmp_path):
    exif = Image.Exif()
    exif.update({0x010F: "Google", 0x0110: "Pixel 7", 0x0132: "2023:01:02 03:04:05"})
    for fmt, name in (("PNG", "a.png"), ("WEBP", "a.webp")):
        path = tmp_path / name
        Image.new("RGB", (16, 12), "blue").save(path, fmt, exif=exif)
        assert read_photo_meta(path) == PhotoMeta(format=fmt, taken_at="2023-01-02T03:04:05", camera_make="Google",
                                                  camera_model="Pixel 7")


def test_a_turned_tiff_keeps_its_orientation(tmp_path):
    # TIFF's decoder turns the image upright and drops the tag: the decode path reads it before.
    exif = Image.Exif()
    exif.update({0x0112: 6, 0x010F: "Nikon"})
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.tif", exif=exif)
    want = PhotoMeta(format="TIFF", camera_make="Nikon", orientation=6)
    shown = open_image(tmp_path / "a.tif")
    assert shown.info["photo_meta"] == read_photo_meta(tmp_path / "a.tif") == want and shown.size == (30, 40)


def test_a_png_exif_chunk_after_the_pixels_is_read_by_the_decode_path(tmp_path):
    exif = Image.Exif()
    exif.update({0x0112: 6, 0x010F: "Nikon"})
    Image.new("RGB", (40, 30), "red").save(tmp_path / "early.png", exif=exif)
    data, chunks, position = (tmp_path / "early.png").read_bytes(), [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    [exif_chunk] = [c for c in chunks if c[4:8] == b"eXIf"]
    others = [c for c in chunks if c[4:8] != b"eXIf"]
    (tmp_path / "late.png").write_bytes(data[:8] + b"".join(others[:-1]) + exif_chunk + others[-1])  # before IEND
    shown = open_image(tmp_path / "late.png")
    assert shown.info["photo_meta"] == PhotoMeta(format="PNG", camera_make="Nikon", orientation=6)
    assert shown.size == (30, 40)  # and the orientation is applied, as before
    assert read_photo_meta(tmp_path / "late.png") == PhotoMeta(format="PNG")  # the header alone does not say


def test_taken_at_prefers_original_then_digitized_then_ifd0_datetime(tmp_path):
    exif = Image.Exif()
    exif[0x0132] = "2020:01:01 00:00:01"
    assert read_photo_meta(jpeg_with(tmp_path, exif)).taken_at == "2020-01-01T00:00:01"
    exif.get_ifd(EXIF_IFD)[0x9004] = "2019:05:06 07:08:09"
    assert read_photo_meta(jpeg_with(tmp_path, exif)).taken_at == "2019-05-06T07:08:09"
    exif.get_ifd(EXIF_IFD)[0x9003] = "2018:12:31 23:59:59"
    assert read_photo_meta(jpeg_with(tmp_path, exif)).taken_at == "2018-12-31T23:59:59"
    exif.get_ifd(EXIF_IFD)[0x9003] = "0000:00:00 00:00:00"  # a camera whose clock was never set: the next one
    assert read_photo_meta(jpeg_with(tmp_path, exif)).taken_at == "2019-05-06T07:08:09"


@pytest.mark.parametrize("value,want", [
    ("2021:07:14 18:03:51", "2021-07-14T18:03:51"),
    ("2021:07:14 18:03:51\x00", "2021-07-14T18:03:51"),
    (b"2021:07:14 18:03:51", "2021-07-14T18:03:51"),
    ("2021-07-14T18:03:51.250+02:00", "2021-07-14T18:03:51"),
    ("0000:00:00 00:00:00", None),
    ("    :  :     :  :  ", None),
    ("2021:02:30 10:00:00", None),
    ("2021:07:14", None),
    ("garbage", None),
    ("", None),
    (20210714, None),
    (None, None),
])
def test_exif_datetimes(value, want):
    assert exif_datetime(value) == want


def test_gps_south_west_and_rationals(tmp_path):
    exif = gps_exif((r(52), r(30), r(36, 10)), (r(0), r(7), r(3930, 100)), "S", "W")
    meta = read_photo_meta(jpeg_with(tmp_path, exif))
    assert (meta.gps_lat, meta.gps_lon) == (-52.501, pytest.approx(-(7 + 39.3 / 60) / 60))


@pytest.mark.parametrize("lat,lon,lat_ref,lon_ref", [
    ((r(52), r(30), r(1, 0)), (r(13), r(24), r(0)), "N", "E"),  # a zero denominator
    ((r(95), r(0), r(0)), (r(13), r(24), r(0)), "N", "E"),  # past the pole
    ((r(52), r(0), r(0)), (r(190), r(0), r(0)), "N", "E"),  # past the date line
    ((r(52), r(75), r(0)), (r(13), r(24), r(0)), "N", "E"),  # 75 minutes
    ((r(52), r(30), r(0)), (r(13), r(24), r(0)), "X", "E"),  # no such hemisphere
    ((r(52), r(30), r(0)), (r(13), r(24), r(0), r(1)), "N", "E"),  # four numbers
])
def test_malformed_gps_gives_neither_coordinate(tmp_path, lat, lon, lat_ref, lon_ref):
    meta = read_photo_meta(jpeg_with(tmp_path, gps_exif(lat, lon, lat_ref, lon_ref, {0x010F: "Nikon"})))
    assert meta == PhotoMeta(format="JPEG", camera_make="Nikon")


def test_gps_without_a_longitude_is_dropped(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (r(52), r(30), r(0))})
    assert read_photo_meta(jpeg_with(tmp_path, exif)) == PhotoMeta(format="JPEG")


@pytest.mark.parametrize("payload", [
    b"Exif\x00\x00garbage garbage garbage",
    b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff\x01\x02",  # 65535 entries promised, two bytes given
    b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x01\x00\x69\x87\x04\x00\x01\x00\x00\x00\xff\xff\xff\x7f",  # IFD far out
    bytes(range(256)) * 4,
])
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # what Pillow says to open_image (the indexer records it)
def test_garbage_exif_gives_nulls_not_a_crash(tmp_path, payload):
    path = jpeg_with(tmp_path, payload)
    assert read_photo_meta(path) == PhotoMeta(format="JPEG")
    assert open_image(path).info["photo_meta"] == PhotoMeta(format="JPEG")  # and the image still decodes


def test_odd_tag_values_are_dropped(tmp_path):
    exif = Image.Exif()
    exif.update({0x010F: " \x00 ", 0x0110: "x" * 1000, 0x0112: 9})
    assert read_photo_meta(jpeg_with(tmp_path, exif)) == PhotoMeta(format="JPEG")


def test_files_that_are_no_images_give_an_empty_meta(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    assert read_photo_meta(tmp_path / "notes.jpg") == PhotoMeta()
    assert read_photo_meta(tmp_path / "gone.jpg") == PhotoMeta()
    assert read_photo_meta(tmp_path) == PhotoMeta()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jpg")
        assert read_photo_meta(tmp_path / "pipe.jpg") == PhotoMeta()  # refused, not read: no hang


def test_decoded_files_carry_their_meta_across_processes(tmp_path):
    path = stamp_photo_meta(make_image(tmp_path / "a.jpg", seed=3, fmt="JPEG"), taken_at="2022-02-02T02:02:02",
                            make="Apple", model="iPhone 13", orientation=8)
    decoded = decode_file(DecodeTask(7, path), FakePreprocess(), draft_size=8)
    assert decoded.error is None and (decoded.width, decoded.height) == (30, 40)
    again = pickle.loads(pickle.dumps(decoded))
    assert again.meta == decoded.meta == PhotoMeta(format="JPEG", taken_at="2022-02-02T02:02:02",
                                                   camera_make="Apple", camera_model="iPhone 13", orientation=8)
    failed = decode_file(DecodeTask(8, tmp_path / "missing.jpg"), FakePreprocess(), draft_size=8)
    assert failed.error and failed.meta is None


def test_stamping_keeps_the_exif_already_there(tmp_path):
    path = stamp_photo_meta(make_image(tmp_path / "a.jpg", seed=4, fmt="JPEG"), make="Sony", gps=(48.8584, 2.2945))
    stamp_photo_meta(path, taken_at="2024:05:06 07:08:09")
    with Image.open(path) as image:
        assert image.format == "JPEG"
    assert read_photo_meta(path) == PhotoMeta(format="JPEG", taken_at="2024-05-06T07:08:09", camera_make="Sony",
                                              gps_lat=48.8584, gps_lon=2.2945)


def test_open_image_of_bytes_records_meta_too():
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "GIF")
    assert open_image(io.BytesIO(buffer.getvalue())).info["photo_meta"] == PhotoMeta(format="GIF")
