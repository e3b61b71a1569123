"""Decode stage: read an image file once, hash it, decode it small, preprocess it for the model.

Runs inside the decoder processes of :mod:`indexer.decoders`, so decoding overlaps with encoding.
Large JPEGs are decoded with PIL's draft mode (the JPEG decoder's DCT scaling, 1/2 to 1/8) at a
size still at least ``DRAFT_FACTOR`` times the model input, which is several times faster than a
full decode and, after the bicubic resize, within a small tolerance of open_clip's own result.
"""

from __future__ import annotations

import errno
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .skips import TOO_LARGE, UNDECODABLE, UNREADABLE, VANISHED

# The draft keeps the shorter side at least DRAFT_FACTOR times the model's input, so the final
# bicubic resize still does the last anti-aliased step. 1 stays within about one grey level (mean)
# of a full decode (tests/test_decode.py) and decodes 1080p at 1/4 scale instead of 1/2.
DRAFT_FACTOR = 1


@dataclass(frozen=True)
class DecodeTask:
    key: int  # the caller's handle for this file (position in its plan)
    path: Path


@dataclass
class Decoded:
    key: int
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    pixels: torch.Tensor | None = None
    error: str | None = None
    cause: str | None = None  # with error, one of indexer.skips' causes: decides when the file is retried


@dataclass
class DecodedBatch:
    """Successfully decoded images stacked in ``pixels`` (one row per entry of ``ok``)."""

    ok: list[Decoded] = field(default_factory=list)
    failed: list[Decoded] = field(default_factory=list)
    pixels: torch.Tensor | None = None


DEFAULT_MAX_MEGAPIXELS = 100.0  # 300 MB as RGB: a few decoders at once stay far from exhausting memory
DEFAULT_DECODE_TIMEOUT = 60.0  # seconds one file may take; a 100 MP PNG decodes in about two


class TooLarge(ValueError):
    """An image over the pixel bound (a decompression bomb, or a scan too big to decode safely)."""


def open_image(source: Path | io.BytesIO, draft_size: int | None = None,
               max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> Image.Image:
    """Open an image as RGB, first frame only, EXIF orientation applied.

    With ``draft_size``, JPEGs are decoded at the smallest DCT scale whose shorter side is still at
    least ``draft_size`` pixels. Returns the image; its ``info["source_size"]`` holds the original
    (width, height) after orientation. Images over ``max_megapixels`` are refused from their header,
    before any pixel is decoded (None: no bound but PIL's own bomb check).
    """
    image = Image.open(source)
    width, height = image.size
    if max_megapixels is not None and width * height > max_megapixels * 1e6:
        raise TooLarge(f"{width}x{height} is {width * height / 1e6:.3g} megapixels, over --max-megapixels "
                       f"{max_megapixels:g}; raise the bound to index it")
    if draft_size:
        # Only the JPEG (and MPO) decoder acts on draft(); it scales by 1/2..1/8 and never below the box.
        image.draft("RGB", (draft_size, draft_size))
    orientation = image.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # 90/270 degree rotations swap the reported size
        width, height = height, width
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if "transparency" in image.info else image.convert("RGB")
    image.info["source_size"] = (width, height)
    return image


def decode_file(task: DecodeTask, preprocess: Callable, draft_size: int | None,
                max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> Decoded:
    """Read, hash and preprocess one file. Never raises: failures come back in ``error``."""
    try:
        data = task.path.read_bytes()
    except OSError as exc:
        return Decoded(task.key, error=f"cannot read file: {exc.strerror or exc}",
                       cause=VANISHED if exc.errno in (errno.ENOENT, errno.ENOTDIR) else UNREADABLE)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = open_image(io.BytesIO(data), draft_size, max_megapixels)
        width, height = image.info["source_size"]
        pixels = preprocess(image)
    except TooLarge as exc:
        return Decoded(task.key, sha256=digest, error=f"image too large: {exc}", cause=TOO_LARGE)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs...)
        return Decoded(task.key, sha256=digest, error=f"cannot decode image: {type(exc).__name__}: {exc}",
                       cause=UNDECODABLE)
    return Decoded(task.key, sha256=digest, width=width, height=height, pixels=pixels)
