"""JPEGs decoded in batches on the model's device: nvJPEG through torchvision on a GPU.

A GPU encodes thousands of images a second, more than CPU cores decode (a 12 MP JPEG costs ~40 ms
of core time). Here CPU threads only read, hash and parse headers; the pixels are decoded a batch at
a time by ``torchvision.io.decode_jpeg(..., device=...)``, turned upright, resized, cropped and
normalised there with tensor operations equal to open_clip's eval transform, and handed to the model
without leaving the device.

Everything this path does not take goes to the CPU decoder processes afterwards (:mod:`indexer.decoders`,
with their timeouts and crash isolation): other formats, CMYK JPEGs, images over the pixel bound,
files the device fails to decode, and every image when the model's transform is not open_clip's.
There they are decoded, or skipped with the reason, exactly as without this path.

On a CPU device the same code runs with torchvision's CPU decoder, which is how it is tested
where there is no GPU; it is the default only for a model on CUDA.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torchvision
from torchvision.io import ImageReadMode

from .decode import Decoded, DecodedBatch, DecodeTask
from .decoders import collate
from .imageio import JpegHeader, jpeg_header, read_regular_file

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
READERS = 8  # threads reading and hashing: file reads and sha256 release the GIL
# A device batch holds its decoded images at once (3 bytes a pixel): 256 phone photos would take 9 GB,
# so a batch also ends at this many pixels.
MAX_BATCH_PIXELS = 10**9
# The antialiased bicubic resize on CUDA needs shared memory growing with the scale, and fails past ~47x
# (pytorch#103589): larger reductions start with an area average down to this many times the size.
MAX_RESIZE_SCALE = 16


@dataclass(frozen=True)
class DeviceTransform:
    """open_clip's eval transform (shorter side resized bicubic with antialias to ``size``, centre crop,
    scaled to [0, 1], normalised) as tensor operations on a uint8 (3, H, W) image on any device."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, preprocess: Callable) -> DeviceTransform | None:
        """The transform ``preprocess`` is, or None when it is anything but open_clip's eval transform."""
        steps = getattr(preprocess, "transforms", None)
        if not steps:
            return None
        by_type = {type(step).__name__: step for step in steps}
        resize, crop, normalize = by_type.get("Resize"), by_type.get("CenterCrop"), by_type.get("Normalize")
        rest = {type(step).__name__ for step in steps} - {"Resize", "CenterCrop", "Normalize"}
        if (resize is None or crop is None or normalize is None or len(steps) != len(by_type)
                or not rest <= {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "function"}):
            return None
        size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
        if (size is None or resize.max_size is not None or str(resize.interpolation.value) != "bicubic"
                or tuple(crop.size) != (size, size)):
            return None
        return cls(size, tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        # As torchvision's Resize(int): the shorter side becomes size, the longer is scaled and truncated.
        if height <= width:
            shape = (self.size, int(self.size * width / height))
        else:
            shape = (int(self.size * height / width), self.size)
        x = image[None].float()
        if min(height, width) > self.size * MAX_RESIZE_SCALE:
            # Most of the reduction by area averaging, as a JPEG draft does on the CPU path
            x = torch.nn.functional.interpolate(x, size=tuple(side * MAX_RESIZE_SCALE for side in shape), mode="area")
        x = torch.nn.functional.interpolate(x, size=shape, mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp_(0, 255).round_()  # PIL's resize gives 8-bit pixels: the same rounding
        top, left = (int(round((side - self.size) / 2.0)) for side in shape)
        x = x[:, top:top + self.size, left:left + self.size] / 255.0
        return (x - _per_channel(self.mean, x.device)) / _per_channel(self.std, x.device)


@functools.cache
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Made once per device: a fresh tensor per image would be a host-to-device copy per image
    return torch.tensor(values, device=device).view(-1, 1, 1)


# EXIF orientation -> the turn PIL's exif_transpose makes, on (C, H, W) tensors
_TURNS = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned as its EXIF ``orientation`` says (PIL's ``exif_transpose``)."""
    return _TURNS[orientation](image) if orientation in _TURNS else image


@dataclass
class _Read:
    task: DecodeTask
    data: bytes | None = None
    sha256: str | None = None
    header: JpegHeader | None = None


def _read(task: DecodeTask, max_megapixels: float | None) -> _Read:
    """Bytes, hash and header of a file this path can decode; just the task (for the CPU path) otherwise."""
    try:
        data = read_regular_file(task.path)
    except Exception:  # gone, unreadable, no longer a regular file: the CPU path reads it again and says so
        return _Read(task)
    header = jpeg_header(data, task.path.name)
    if header is None or (max_megapixels is not None and header.width * header.height > max_megapixels * 1e6):
        return _Read(task)
    return _Read(task, data, hashlib.sha256(data).hexdigest(), header)


def _read_ahead(tasks: Sequence[DecodeTask], pool: ThreadPoolExecutor, ahead: int,
                max_megapixels: float | None) -> Iterator[_Read]:
    """Files read in order by ``pool``, at most ``ahead`` in memory at once."""
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(pool.submit(_read, task, max_megapixels))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _decode_on(device: torch.device, reads: list[_Read]) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) images on ``device``, None where the device could not decode one."""
    if device.type == "cuda":
        # torchvision's nvJPEG decoder runs on a stream of its own, which does not wait for ours
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.frombuffer on read-only bytes (never written to), and
        # torchvision's notice that its decoders move to TorchCodec
        inputs = [torch.frombuffer(r.data, dtype=torch.uint8) for r in reads]
        try:
            return list(torchvision.io.decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the batch: find it by decoding each alone
            out: list[torch.Tensor | None] = []
            for data in inputs:
                try:
                    out.append(torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def iter_decoded_on_device(tasks: Sequence[DecodeTask], preprocess: Callable, device: torch.device,
                           cpu_batches: Callable[[Sequence[DecodeTask]], Iterator[DecodedBatch]], *,
                           batch_size: int = 256, max_megapixels: float | None = None,
                           readers: int = READERS) -> Iterator[DecodedBatch]:
    """Batches of ``tasks`` decoded on ``device``; then what it did not take through ``cpu_batches``
    (the CPU decoder processes). Batch order is not task order: each item carries its task's key."""
    transform = DeviceTransform.of(preprocess)
    if transform is None:
        yield from cpu_batches(tasks)
        return
    mine = [t for t in tasks if t.path.suffix.lower() in JPEG_SUFFIXES]
    left = [t for t in tasks if t.path.suffix.lower() not in JPEG_SUFFIXES]
    with ThreadPoolExecutor(readers, thread_name_prefix="cm-read") as pool:
        batch: list[_Read] = []
        pixels = 0
        for read in _read_ahead(mine, pool, 3 * batch_size, max_megapixels):
            if read.header is None:
                left.append(read.task)
                continue
            batch.append(read)
            pixels += read.header.width * read.header.height
            if len(batch) == batch_size or pixels >= MAX_BATCH_PIXELS:
                yield from _batch_on(device, transform, batch, left)
                batch, pixels = [], 0
        if batch:
            yield from _batch_on(device, transform, batch, left)
    if left:
        yield from cpu_batches(sorted(left, key=lambda t: t.key))


def _batch_on(device: torch.device, transform: DeviceTransform, reads: list[_Read],
              left: list[DecodeTask]) -> Iterator[DecodedBatch]:
    items = []
    images = _decode_on(device, reads)
    for n, read in enumerate(reads):
        image, images[n] = images[n], None  # each decoded image freed once transformed
        try:
            pixels = None if image is None else transform(upright(image, read.header.orientation))
        except RuntimeError:  # out of device memory, a kernel's limit: this file goes to the CPU path
            pixels = None
        if pixels is None:
            left.append(read.task)
            continue
        header = read.header
        size = (header.height, header.width) if header.orientation >= 5 else (header.width, header.height)
        items.append(Decoded(read.task.key, sha256=read.sha256, width=size[0], height=size[1], pixels=pixels,
                             meta=header.meta))
    if items:
        yield collate(items)
