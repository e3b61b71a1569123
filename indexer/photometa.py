"""What a photo's header says about it: format, when it was taken, the camera, its orientation, where.

Read from the header only (EXIF is in the first kilobytes of a JPEG), so recording it costs no extra
decode: :func:`indexer.imageio.open_image` reads it on the image it decodes anyway, and
:func:`read_photo_meta` fills rows indexed before this was recorded without touching their pixels.
EXIF written by cameras, phones and editors is often broken (dates of zeros, rationals over zero,
offsets past the end), so nothing here raises: a field that cannot be read is None.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from dataclasses import dataclass

from PIL import Image

# Stored with the fields (items.meta_version): rows below it are read again by the next index run.
# Raise it when this module learns to read more (or reads something differently).
META_VERSION = 1

# EXIF tags: IFD0, the Exif sub-IFD and the GPS sub-IFD.
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4

_MAX_TEXT = 255  # longer make/model strings are garbage, not a camera's name
# "2021:07:14 18:03:51", also with dashes, a T, fractions of a second or a UTC offset after it.
_EXIF_DATE = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")


@dataclass(frozen=True)
class PhotoMeta:
    """A photo's header metadata; None where the file says nothing (or nothing readable).

    ``taken_at`` is ISO 'YYYY-MM-DDTHH:MM:SS' in the camera's local time (EXIF has no time zone);
    ``gps_lat``/``gps_lon`` are decimal degrees, south and west negative, both set or both None.
    """

    format: str | None = None  # Pillow's name: 'JPEG', 'PNG', 'WEBP', ...
    taken_at: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    orientation: int | None = None  # EXIF orientation 1..8 (the pixels indexed are already turned upright)
    gps_lat: float | None = None
    gps_lon: float | None = None


def photo_meta(image: Image.Image) -> PhotoMeta:
    """The metadata of an opened image, decoded or not; never decodes pixels and never raises.

    Read it before decoding (TIFF's decoder turns the image upright and drops the orientation) unless
    :func:`meta_after_decode` says the rest of it may follow the pixels.
    """
    fmt = image.format if isinstance(image.format, str) else None
    try:
        exif = _exif(image)
    except Exception:  # a broken EXIF block: the format is still known
        return PhotoMeta(format=fmt)
    exif_ifd, gps_ifd = _ifd(exif, _EXIF_IFD), _ifd(exif, _GPS_IFD)
    dates = (exif_ifd.get(_DATETIME_ORIGINAL), exif_ifd.get(_DATETIME_DIGITIZED), _get(exif, _DATETIME))
    lat, lon = _gps(gps_ifd)
    return PhotoMeta(format=fmt, taken_at=next((d for d in map(exif_datetime, dates) if d), None),
                     camera_make=_text(_get(exif, _MAKE)), camera_model=_text(_get(exif, _MODEL)),
                     orientation=_orientation(_get(exif, _ORIENTATION)), gps_lat=lat, gps_lon=lon)


def read_photo_meta(path: str | os.PathLike) -> PhotoMeta:
    """The metadata of an image file, from its header alone (for rows indexed before it was recorded).

    Never raises and never prints: a file that is gone, not an image or unreadable gives an empty
    PhotoMeta, and what the image libraries say while reading is dropped.
    """
    from .imageio import library_output, open_header  # imageio imports this module (open_image records it)

    try:
        with library_output(), open_header(path) as image:
            return photo_meta(image)
    except Exception:
        return PhotoMeta()


def meta_after_decode(image: Image.Image) -> bool:
    """Whether part of the metadata may follow the pixels: a PNG's eXIf chunk may come after them (Pillow
    decodes the image to find it). Before decoding such an image, :func:`photo_meta` gives what precedes them."""
    return image.format == "PNG" and "exif" not in image.info and bool(getattr(image, "tile", None))


def exif_datetime(value: object) -> str | None:
    """An EXIF date-time ('2021:07:14 18:03:51') as ISO 'YYYY-MM-DDTHH:MM:SS'; None for zeros or garbage."""
    text = _text(value)
    match = _EXIF_DATE.fullmatch(text) if text else None
    if match is None:
        return None
    try:
        return dt.datetime(*map(int, match.groups())).isoformat(timespec="seconds")
    except ValueError:  # '0000:00:00 00:00:00', month 13, February 30...
        return None


def _exif(image: Image.Image) -> Image.Exif:
    if not meta_after_decode(image):
        return image.getexif()
    # What precedes a PNG's pixels, read without its getexif() (which would decode it, then keep an
    # answer without a later eXIf chunk): EXIF as ImageMagick writes it, in a text chunk.
    exif = Image.Exif()
    raw = image.info.get("Raw profile type exif")
    if isinstance(raw, str):
        exif.load(bytes.fromhex("".join(raw.split("\n")[3:])))
    return exif


def _ifd(exif: Image.Exif, tag: int) -> dict:
    try:
        found = exif.get_ifd(tag)
    except Exception:  # an offset past the end, a loop, a truncated entry...
        return {}
    return found if isinstance(found, dict) else {}


def _get(exif: Image.Exif, tag: int) -> object:
    try:
        return exif.get(tag)
    except Exception:
        return None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00").split("\x00", 1)[0].strip()  # C strings, padded with NULs or spaces
    return text if 0 < len(text) <= _MAX_TEXT and text.isprintable() else None


def _orientation(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8 else None


def _gps(gps: dict) -> tuple[float | None, float | None]:
    """Latitude and longitude in degrees, both or neither: a malformed or impossible value drops the pair."""
    lat = _degrees(gps.get(_LAT), gps.get(_LAT_REF), "N", "S", 90.0)
    lon = _degrees(gps.get(_LON), gps.get(_LON_REF), "E", "W", 180.0)
    return (lat, lon) if lat is not None and lon is not None else (None, None)


def _degrees(value: object, ref: object, positive: str, negative: str, bound: float) -> float | None:
    hemisphere = _text(ref)
    if hemisphere is None or hemisphere.upper() not in (positive, negative):
        return None
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(part) for part in value]  # IFDRationals; one over zero is NaN
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not all(math.isfinite(p) and p >= 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        return None
    degrees = sum(part / 60**i for i, part in enumerate(parts))
    if degrees > bound:
        return None
    return round(-degrees if hemisphere.upper() == negative else degrees, 7)
