"""Decode stage: read an image file once, hash it, decode it small, preprocess it for the model.

Runs inside DataLoader worker processes so decoding overlaps with encoding in the main process.
Large JPEGs are decoded with PIL's draft mode (the JPEG decoder's DCT scaling, 1/2 to 1/8) at a
size still at least ``DRAFT_FACTOR`` times the model input, which is several times faster than a
full decode and, after the bicubic resize, within a small tolerance of open_clip's own result.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

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
    warnings: list[str] = field(default_factory=list)  # what the image libraries said about this file


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
        return Decoded(task.key, error=f"cannot read file: it is {exc.kind}, not a regular file")
    except OSError as exc:
        return Decoded(task.key, error=f"cannot read file: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = open_image(io.BytesIO(data), draft_size, max_megapixels, name=task.path.name)
        width, height = image.info["source_size"]
        pixels = preprocess(image)
    except TooLarge as exc:
        return Decoded(task.key, sha256=digest, error=f"image too large: {exc.width}x{exc.height} is "
                       f"{exc.megapixels:.3g} megapixels, over --max-megapixels {exc.max_megapixels:g}; "
                       "raise --max-megapixels to index it")
    except NotAnImage as exc:
        return Decoded(task.key, sha256=digest, error=f"cannot decode image: {exc}")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs...)
        return Decoded(task.key, sha256=digest, error=f"cannot decode image: {stable_message(exc)}")
    return Decoded(task.key, sha256=digest, width=width, height=height, pixels=pixels)


# A wait this long for one decoded image means the decoders are not getting the CPU (another
# program keeps every core busy), not that an image is slow: a 12 MP JPEG takes ~40 ms.
STARVED_AFTER_S = 1.0


def _lower_priority() -> None:
    # SCHED_IDLE (Linux) runs this thread only on time no other thread of the machine wants.
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


class _FileDataset(Dataset):
    """Decodes on an idle-priority thread while the model keeps the cores busy.

    On a CPU the model's threads leave short gaps (waiting for each other between layers); at idle
    priority the decoders run in those gaps and are preempted the moment the model wants the core
    back. At normal priority a decoder preempts one model thread and the other one waits for it at
    the next barrier, so each decoded image costs the model about twice its decode time. An
    unprivileged thread cannot leave SCHED_IDLE again, so the decode runs on a helper thread and the
    worker's own (normal priority) thread takes over once the main process reports starvation.
    """

    def __init__(self, tasks: Sequence[DecodeTask], preprocess: Callable, draft_size: int | None, starved,
                 max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS):
        self.tasks = tasks
        self.preprocess = preprocess
        self.draft_size = draft_size
        self.max_megapixels = max_megapixels
        self.starved = starved
        self._idle: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Decoded:
        args = (self.tasks[index], self.preprocess, self.draft_size, self.max_megapixels)
        if self.starved is None or self.starved.value:
            return decode_file(*args)
        if self._idle is None:
            self._idle = ThreadPoolExecutor(1, initializer=_lower_priority)
        return self._idle.submit(decode_file, *args).result()


def _ignore_interrupts(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; only the main process should act on it (stop after
    # the current batch, flush, say how to resume), not every decoder with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collate(items: list[Decoded]) -> DecodedBatch:
    batch = DecodedBatch()
    for item in items:
        (batch.ok if item.pixels is not None else batch.failed).append(item)
    if batch.ok:
        batch.pixels = torch.stack([item.pixels for item in batch.ok])
        for item in batch.ok:
            item.pixels = None  # the stacked tensor holds them now
    return batch


def iter_decoded(
    tasks: Sequence[DecodeTask],
    preprocess: Callable,
    image_size: int,
    *,
    batch_size: int = 32,
    workers: int = 2,
    use_draft: bool = True,
    idle_priority: bool = True,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
    timeout: float = DEFAULT_DECODE_TIMEOUT,
) -> Iterator[DecodedBatch]:
    """Decode ``tasks`` in ``workers`` processes (0 = in this process), yielding batches in order.

    Workers hand back single images, not whole batches, so the first batch is ready after
    ``batch_size / workers`` decodes instead of ``batch_size``, and no worker sits on a half-done batch.
    A file that kills its decoder process or keeps it busy over ``timeout`` seconds comes back as
    failed, and decoding goes on after it.
    """
    draft_size = image_size * DRAFT_FACTOR if use_draft else None
    starved = multiprocessing.Value("b", 0, lock=False) if workers > 0 and idle_priority else None

    def dataset(part: Sequence[DecodeTask]) -> _FileDataset:
        return _FileDataset(part, preprocess, draft_size, starved, max_megapixels)

    items = _survive_decoders(tasks, dataset, workers, 2 * batch_size, timeout)
    pending: list[Decoded] = []
    # The first batch is smaller so the model starts after a few decodes instead of a whole batch;
    # on a CPU that is most of the time the model would otherwise sit waiting.
    wanted = min(batch_size, max(1, 2 * workers, batch_size // 4)) if workers > 0 else batch_size
    waited_since = time.monotonic()
    for item in items:
        if starved is not None and time.monotonic() - waited_since > STARVED_AFTER_S:
            starved.value = 1
        pending.append(item)
        if len(pending) == wanted:
            yield _collate(pending)
            pending, wanted = [], batch_size
        waited_since = time.monotonic()
    if pending:
        yield _collate(pending)


def _survive_decoders(tasks: Sequence[DecodeTask], dataset: Callable[[Sequence[DecodeTask]], _FileDataset],
                      workers: int, prefetch: int, timeout: float) -> Iterator[Decoded]:
    """Decoded items in order from worker processes; when a worker dies or stalls, the first file not
    yet delivered is decoded alone in a process of its own (its failure becomes its error) and the
    workers start again after it. Each restart moves past one file, so a run always ends."""
    start = 0
    while start < len(tasks):
        loader = DataLoader(dataset(tasks[start:]), batch_size=None, num_workers=workers,
                            prefetch_factor=prefetch if workers > 0 else None,
                            worker_init_fn=_ignore_interrupts if workers > 0 else None,
                            timeout=timeout if workers > 0 else 0)
        try:
            for item in loader:
                start += 1
                yield item
            return
        except RuntimeError as exc:
            if workers == 0 or "DataLoader" not in str(exc):  # a worker died or timed out; else a bug
                raise
        del loader
        yield _decode_alone(dataset(tasks[start:start + 1]), timeout)
        start += 1


def _send_decoded(single: _FileDataset, send) -> None:
    item = single[0]
    if item.pixels is not None:
        item.pixels = item.pixels.numpy()  # by value: nothing shared with a process about to be killed
    send.send(item)


def _decode_alone(single: _FileDataset, timeout: float) -> Decoded:
    task = single.tasks[0]
    context = multiprocessing.get_context("fork")  # the decoder's state as the workers had it, no pickling
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_send_decoded, args=(single, send), daemon=True)
    process.start()
    send.close()
    ready = receive.poll(timeout)
    try:
        if ready:
            item = receive.recv()
            if item.pixels is not None:
                item.pixels = torch.from_numpy(item.pixels)
            return item
    except EOFError:  # it died before sending
        pass
    finally:
        process.kill()
        process.join()
        receive.close()
    if not ready:
        return Decoded(task.key, error=f"decoding took over {timeout:g}s (--decode-timeout); skipped")
    return Decoded(task.key, error=f"the decoder crashed on this file (exit code {process.exitcode}); skipped")
