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

from .imageio import (
    DEFAULT_MAX_MEGAPIXELS,
    NotAnImage,
    NotARegularFile,
    TooLarge,
    library_output,
    open_image,
    read_regular_file,
    stable_message,
)
from .photometa import PhotoMeta
from .skips import NOT_REGULAR, TOO_LARGE, UNDECODABLE, UNREADABLE, VANISHED

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
    warnings: list[str] = field(default_factory=list)  # what the image libraries said about this file
    meta: PhotoMeta | None = None  # the header's metadata, read by open_image on the way (decoded files only)


@dataclass
class DecodedBatch:
    """Successfully decoded images stacked in ``pixels`` (one row per entry of ``ok``)."""

    ok: list[Decoded] = field(default_factory=list)
    failed: list[Decoded] = field(default_factory=list)
    pixels: torch.Tensor | None = None


DEFAULT_DECODE_TIMEOUT = 60.0  # seconds one file may take; a 100 MP PNG decodes in about two


def decode_file(task: DecodeTask, preprocess: Callable, draft_size: int | None,
                max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> Decoded:
    """Read, hash and preprocess one file. Never raises: failures come back in ``error``, and what the
    image libraries said (warnings, libtiff's messages) in ``warnings`` instead of on stderr."""
    with library_output() as said:
        decoded = _decode_file(task, preprocess, draft_size, max_megapixels)
    decoded.warnings = said.capped()
    return decoded


def _decode_file(task: DecodeTask, preprocess: Callable, draft_size: int | None,
                 max_megapixels: float | None) -> Decoded:
    try:
        data = read_regular_file(task.path)
    except NotARegularFile as exc:
        return Decoded(task.key, error=f"cannot read file: it is {exc.kind}, not a regular file", cause=NOT_REGULAR)
    except OSError as exc:
        return Decoded(task.key, error=f"cannot read file: {exc.strerror or exc}",
                       cause=VANISHED if exc.errno in (errno.ENOENT, errno.ENOTDIR) else UNREADABLE)
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = open_image(io.BytesIO(data), draft_size, max_megapixels, name=task.path.name)
        width, height = image.info["source_size"]
        meta = image.info.get("photo_meta")
        pixels = preprocess(image)
    except TooLarge as exc:
        return Decoded(task.key, sha256=digest, error=f"image too large: {exc.width}x{exc.height} is "
                       f"{exc.megapixels:.3g} megapixels, over --max-megapixels {exc.max_megapixels:g}; "
                       "raise --max-megapixels to index it", cause=TOO_LARGE)
    except NotAnImage as exc:
        return Decoded(task.key, sha256=digest, error=f"cannot decode image: {exc}", cause=UNDECODABLE)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs...)
        return Decoded(task.key, sha256=digest, error=f"cannot decode image: {stable_message(exc)}",
                       cause=UNDECODABLE)
    return Decoded(task.key, sha256=digest, width=width, height=height, pixels=pixels, meta=meta)
