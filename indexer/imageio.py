"""Reading one image file into an 8-bit RGB PIL image, and what the image libraries said meanwhile.

Everything here is per file and process-local: the decode pipeline (:mod:`indexer.decode`) runs it
in decoder processes, the searcher and the trainer in their own. Errors are typed; nothing prints.
Pillow's process-wide state (its decompression-bomb limit, the ``warnings`` filters, file
descriptor 2) is changed only for the span of one decode, under one lock, so decodes that capture
run one at a time per process.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .photometa import PhotoMeta, meta_after_decode, photo_meta

DEFAULT_MAX_MEGAPIXELS = 100.0  # 300 MB as RGB: a few decoders at once stay far from exhausting memory
MAX_WARNINGS = 20  # lines kept per file; a broken file can make a library repeat itself thousands of times

# Single-channel modes holding more than 8 bits: PIL's convert("RGB") clips them at 255 instead of scaling.
# Pillow reads 16-bit signed and 32-bit integer TIFFs as "I", 32-bit float ones (and PFM) as "F".
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;32", "I;32S"})
# What a constant image is scaled by, having no range of its own: integers as 16-bit (what most "I" and
# every "I;16" image holds), floats as 0..1.
_NOMINAL_MAX = {"i": 65535.0, "u": 65535.0, "f": 1.0}
_CHUNK_PIXELS = 1 << 22  # rows converted at a time, so a 100 MP image needs tens of MB extra, not 400
_HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})
_MAX_CAPTURED_BYTES = 1 << 20  # of one file's fd 2 output: far more than MAX_WARNINGS lines

_STATE = threading.RLock()  # guards Image.MAX_IMAGE_PIXELS, warnings filters and fd 2 while they are changed
os.register_at_fork(after_in_child=lambda: globals().update(_STATE=threading.RLock()))


class TooLarge(ValueError):
    """An image over the pixel bound (a decompression bomb, or a scan too big to decode safely)."""

    def __init__(self, width: int, height: int, max_megapixels: float):
        super().__init__(width, height, max_megapixels)
        self.width, self.height, self.max_megapixels = width, height, max_megapixels

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    def __str__(self) -> str:
        return (f"{self.width}x{self.height} is {self.megapixels:.3g} megapixels, over the "
                f"{self.max_megapixels:g}-megapixel limit")


class NotAnImage(ValueError):
    """Contents that no installed image reader recognises (text named .png, random bytes, an empty file)."""

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        suffix = Path(self.name).suffix.lower() if self.name else ""
        if suffix in _HEIF_SUFFIXES and not _heif_available():
            return f"not a recognised image format: {suffix} files need pillow-heif (pip install pillow-heif)"
        if suffix:
            return f"not a recognised image format (named {suffix}, but the contents are no image we can read)"
        return "not a recognised image format"


class NotARegularFile(ValueError):
    """A FIFO, socket, device or folder where an image file was expected: reading it could block forever."""

    def __init__(self, path: Path, kind: str):
        super().__init__(path, kind)
        self.path, self.kind = path, kind

    def __str__(self) -> str:
        return f"{self.path} is {self.kind}, not a regular file"


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file before reading from it.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO swapped in after a
    check cannot hang the read. Raises :class:`NotARegularFile`, or the ``OSError`` of the open or the read.
    """
    with _open_regular(path) as handle:
        return handle.read()


def _open_regular(path: Path) -> BinaryIO:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # what opening a Unix socket gives
            raise NotARegularFile(Path(path), _kind_of(os.stat(path).st_mode)) from None
        raise
    handle = os.fdopen(fd, "rb")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(Path(path), _kind_of(mode))
    except BaseException:
        handle.close()
        raise
    return handle


def _kind_of(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def open_image(source: str | os.PathLike | io.BytesIO, draft_size: int | None = None,
               max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS, *, name: str | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, first frame only, EXIF orientation applied.

    With ``draft_size``, JPEGs are decoded at the smallest DCT scale whose shorter side is still at
    least ``draft_size`` pixels. Returns the image; its ``info["source_size"]`` holds the original
    (width, height) after orientation, ``info["photo_meta"]`` the file's header metadata
    (:class:`indexer.photometa.PhotoMeta`, read on the way: no second read or decode). Images over
    ``max_megapixels`` are refused from their header, before any pixel is decoded, with
    :class:`TooLarge` (None: no bound but Pillow's own bomb check).
    Single-channel images deeper than 8 bits are scaled by their own range. ``name`` (the file's name,
    for messages) defaults to the path's. Raises :class:`NotAnImage` for contents no reader knows.
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or os.path.basename(source)
        source = io.BytesIO(read_regular_file(Path(source)))
    with _STATE:
        # With our own bound, Pillow's (~89 MP warning, ~179 MP error, raised inside Image.open) must not
        # speak first: the header is read with it off and checked against ours here.
        image = _identify(source, name, None if max_megapixels is not None else Image.MAX_IMAGE_PIXELS)
        width, height = image.size
        if max_megapixels is not None and width * height > max_megapixels * 1e6:
            raise TooLarge(width, height, max_megapixels)
        # The header's metadata, before decoding (TIFF's decoder turns the image upright and drops the
        # orientation), or after it where part may follow the pixels (a PNG's eXIf chunk).
        meta = None if meta_after_decode(image) else photo_meta(image)
        if draft_size:
            # Only the JPEG (and MPO) decoder acts on draft(); it scales by 1/2..1/8 and never below the box.
            image.draft("RGB", (draft_size, draft_size))
        try:
            with _pillow_bound(max_megapixels):
                if meta is None:
                    image.load()  # what exif_transpose does first
                    meta = photo_meta(image)
                image = to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError:  # a frame or tile larger than the header said (GIF, TIFF)
            if max_megapixels is None:
                raise
            raise TooLarge(*image.size, max_megapixels) from None
    image.info["source_size"] = _as_shown((width, height), image.size)
    image.info["photo_meta"] = meta
    return image


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header says, for decoders that turn its bytes into pixels themselves (nvJPEG)."""

    width: int  # as stored, before the orientation is applied
    height: int
    orientation: int  # EXIF orientation, 1 (upright) to 8
    meta: PhotoMeta


def jpeg_header(data: bytes, name: str) -> JpegHeader | None:
    """The header of ``data`` when it is a baseline or progressive JPEG of RGB or grey pixels; None for
    anything else (other formats, CMYK, unreadable): :func:`open_image` is the way for those."""
    try:
        with _STATE:
            image = _identify(io.BytesIO(data), name, None)
        with image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            orientation = image.getexif().get(0x0112, 1)
            return JpegHeader(*image.size, orientation if orientation in range(1, 9) else 1, photo_meta(image))
    except Exception:  # PIL raises many types on a broken header; the full decoder will say what is wrong
        return None


@contextmanager
def open_header(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``path`` opened for its header alone (format, size, EXIF); its pixels are never decoded, so no
    pixel bound applies. Refuses what is not a regular file, as :func:`read_regular_file` does; raises
    :class:`NotAnImage` for contents no reader knows, and the ``OSError`` of the open."""
    path = Path(path)
    with _open_regular(path) as handle:
        with _STATE:
            image = _identify(handle, path.name, None)
        with image:
            yield image


def _as_shown(header: tuple[int, int], shown: tuple[int, int]) -> tuple[int, int]:
    # An EXIF rotation by 90/270 degrees swaps width and height; Pillow reports some formats' header
    # size already rotated (TIFF), others not (JPEG), so the decoded image's shape decides. A draft
    # scales both sides alike, so it never flips which side is longer.
    (width, height), (shown_width, shown_height) = header, shown
    return (height, width) if (width - height) * (shown_width - shown_height) < 0 else (width, height)


def _identify(source: BinaryIO, name: str | None, bound: int | None) -> Image.Image:
    # Image.open under Pillow's pixel limit ``bound`` (None: off); HEIF is registered when a file needs it.
    with _pillow_limit(bound):
        try:
            return Image.open(source)
        except UnidentifiedImageError:
            source.seek(0)
            if not (_is_iso_media(source.read(12)) and _register_heif()):
                raise NotAnImage(name) from None
        source.seek(0)
        try:
            return Image.open(source)
        except UnidentifiedImageError:
            raise NotAnImage(name) from None


@contextmanager
def _pillow_limit(pixels: int | None) -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def _pillow_bound(max_megapixels: float | None) -> Iterator[None]:
    """While pixels are decoded, make Pillow's own checks (frames and tiles it meets only then) refuse
    exactly what is over our bound: it errors at twice its limit, and its warning at the limit is ours
    to ignore, since the header already passed our check."""
    if max_megapixels is None:
        yield
        return
    with _pillow_limit(max(1, int(max_megapixels * 1e6) // 2)), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens; grayscale stays gray (R = G = B), alpha is dropped.

    Alpha is dropped rather than composited, as open_clip's own preprocessing does, so a transparent
    image embeds the same here as in the model's training and evaluation pipelines.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return stretch_to_8bit(image).convert("RGB")
    if image.mode == "La":  # premultiplied: PIL converts it to nothing but LA
        image = image.convert("LA")
    if "transparency" in image.info:  # palette or gray with a transparent colour: through RGBA, or PIL warns
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def stretch_to_8bit(image: Image.Image) -> Image.Image:
    """An 'L' image from a single-channel one of any depth, its minimum black and its maximum white, as
    image viewers show 16-bit and float data. NaN is black, +inf white, -inf black; a constant image
    (or one with no finite value) is scaled by its type's nominal range, 0..65535 or 0..1."""
    values = np.asarray(image)
    limits = _finite_range(values)
    if limits is None or limits[0] == limits[1]:
        limits = (0.0, _NOMINAL_MAX[values.dtype.kind])
    low, high = limits
    scale = 255.0 / (high - low)
    out = np.empty(values.shape, dtype=np.uint8)
    for rows in _row_chunks(values.shape):
        chunk = values[rows].astype(np.float32)
        if values.dtype.kind == "f":
            np.nan_to_num(chunk, copy=False, nan=low, posinf=high, neginf=low)
        np.clip((chunk - low) * scale + 0.5, 0, 255, out=chunk)
        out[rows] = chunk
    return Image.fromarray(out)


def _finite_range(values: np.ndarray) -> tuple[float, float] | None:
    if values.dtype.kind != "f":
        return (float(values.min()), float(values.max())) if values.size else None
    low, high = np.inf, -np.inf
    for rows in _row_chunks(values.shape):
        chunk = values[rows]
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else None


def _row_chunks(shape: tuple[int, ...]) -> Iterator[slice]:
    step = max(1, _CHUNK_PIXELS // max(1, shape[1]))
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def _is_iso_media(head: bytes) -> bool:
    return head[4:8] == b"ftyp"  # HEIF, HEIC and AVIF are all ISO base media files


_heif_registered = False


def _register_heif() -> bool:
    """Teach Pillow HEIF/HEIC through pillow-heif, once per process and only when a file needs it, so
    neither ``import indexer`` nor a folder without HEIC pays for importing it. (Pillow 13 reads AVIF
    itself.) False when pillow-heif is not installed."""
    global _heif_registered
    if not _heif_registered:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return False
        register_heif_opener()
        _heif_registered = True
    return True


def _heif_available() -> bool:
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable_message(exc: BaseException) -> str:
    """``Type: message`` without the memory addresses some reprs carry, so a file fails the same way twice."""
    return _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")


class LibraryOutput:
    """What the image libraries said during a :func:`library_output` block, as clean unique lines."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}  # insertion-ordered set: a broken file may repeat a line thousands of times

    @property
    def lines(self) -> list[str]:
        return list(self._lines)

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self._lines[line.strip()] = None

    def capped(self, limit: int = MAX_WARNINGS) -> list[str]:
        lines = self.lines
        extra = len(lines) - limit
        return lines if extra <= 0 else lines[:limit] + [f"... {extra} more"]


# Whether this process may take file descriptor 2 for a moment to collect what C libraries write
# there. Only decoder processes (indexer.decoders) say yes: nothing else of theirs writes to it. In a
# process that talks to the user, a message written meanwhile (the Ctrl-C notice, another thread's
# log) would end up in some file's warnings, so there C-level output is left on the terminal.
_NATIVE = {"capture": False}


def capture_native_output(enabled: bool = True) -> None:
    """Let :func:`library_output` redirect fd 2 in this process (call it in a decoder process)."""
    _NATIVE["capture"] = enabled


@contextmanager
def library_output() -> Iterator[LibraryOutput]:
    """Collect, instead of letting them reach the terminal, the Python warnings raised in the block
    (Pillow's UserWarnings, DecompressionBombWarning, ...) and, in a decoder process (see
    :func:`capture_native_output`), what C libraries write straight to file descriptor 2 (libtiff's
    errors). fd 2 is always put back, also when the block raises."""
    said = LibraryOutput()
    with _STATE, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the default shows each warning once per process: we want each file's
        try:
            if _NATIVE["capture"]:
                with _stderr_to(said):
                    yield said
            else:
                yield said
        finally:
            for warning in caught:
                said.add(str(warning.message))


@contextmanager
def _stderr_to(said: LibraryOutput) -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (a daemon): nothing can reach a terminal anyway
        yield
        return
    # A file, not a pipe: a library that writes more than a pipe holds would block with nobody reading.
    with tempfile.TemporaryFile() as handle:
        _flush_stderr()
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            handle.seek(0)
            said.add(handle.read(_MAX_CAPTURED_BYTES).decode("utf-8", "replace"))


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # None, closed, or a broken pipe
        pass
