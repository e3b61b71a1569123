"""Decoder processes: files decoded in worker processes that this module owns, in order, in batches.

The indexer forks its own decoders instead of using torch's DataLoader, whose worker machinery
reports a dead worker by raising from a SIGCHLD handler at whatever line the main process happens
to run (a catalog write, the model), and passes tensors through shared-memory file descriptors
that break when a worker dies mid-transfer. Here a dead worker is just an event the pool handles:

- Each worker holds a few tasks and decodes them first in, first out, so the first task it has not
  answered is the one it was decoding. When it dies (any signal, any exit) or spends longer than
  the timeout on one file, that file is retried alone in a process of its own and skipped with the
  reason if it fails there too; the worker's other tasks go back to the queue; a new worker takes
  its place. A run therefore always ends, and a killed worker costs at most a re-decode.
- Results travel by value (numpy arrays pickled through a pipe), each stamped with the time the
  worker finished it, so a timeout counts the worker's own time even while the main process is
  busy encoding and not reading.
- Processes are forked only from the thread that iterates, between batches, never while the model
  runs, so a child never inherits a lock held mid-operation.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np
import torch

from . import decode
from .decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_MEGAPIXELS, Decoded, DecodedBatch, DecodeTask
from .imageio import capture_native_output
from .skips import CRASHED, TIMEOUT, UNDECODABLE

# A wait this long for one decoded image means the decoders are not getting the CPU (another
# program keeps every core busy), not that an image is slow: a 12 MP JPEG takes ~40 ms.
STARVED_AFTER_S = 1.0
WORKER_NAME, ALONE_NAME = b"cm-decoder", b"cm-decode-alone"  # what ps and /proc/PID/comm show


@dataclass(frozen=True)
class FileDecoder:
    """decode.decode_file with the run's settings: what a worker process calls for each task."""

    preprocess: Callable
    draft_size: int | None
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS

    def __call__(self, task: DecodeTask) -> Decoded:
        # Looked up at call time so a test can stand in for decode_file in the forked workers.
        return decode.decode_file(task, self.preprocess, self.draft_size, self.max_megapixels)


def collate(items: list[Decoded]) -> DecodedBatch:
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
    decoder: Callable[[DecodeTask], Decoded] | None = None,
) -> Iterator[DecodedBatch]:
    """Decode ``tasks`` in ``workers`` processes (0 = in this process), yielding batches in order.

    Workers hand back single images, not whole batches, so the first batch is ready after
    ``batch_size / workers`` decodes instead of ``batch_size``. A file that kills its decoder or
    keeps it busy over ``timeout`` seconds comes back as failed, and decoding goes on after it.
    ``decoder`` replaces the per-file function (default: :class:`FileDecoder` with these settings).
    """
    decoder = decoder or FileDecoder(preprocess, image_size * decode.DRAFT_FACTOR if use_draft else None,
                                     max_megapixels)
    if workers <= 0:
        items: Iterator[Decoded] = map(decoder, tasks)
        wanted = batch_size
        starved = None
    else:
        starved = multiprocessing.get_context("fork").Value("b", 0, lock=False) if idle_priority else None
        items = _Pool(decoder, workers, timeout, 2 * batch_size, starved).imap(tasks)
        # A smaller first batch lets the model start after a few decodes instead of a whole batch.
        wanted = min(batch_size, max(1, 2 * workers, batch_size // 4))
    pending: list[Decoded] = []
    waited_since = time.monotonic()
    try:
        for item in items:
            if starved is not None and time.monotonic() - waited_since > STARVED_AFTER_S:
                starved.value = 1
            pending.append(item)
            if len(pending) == wanted:
                yield collate(pending)
                pending, wanted = [], batch_size
            waited_since = time.monotonic()
        if pending:
            yield collate(pending)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # stops the workers now, also when the consumer stops early (Ctrl-C, an error)


# -- inside a worker process -------------------------------------------------------------------

def _name_process(name: bytes) -> None:
    # Linux: the name ps shows, and a parent-death signal so a decoder stuck in a hang never outlives
    # an indexer that was killed.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _lower_priority() -> None:
    # SCHED_IDLE (Linux) runs this thread only on time no other thread of the machine wants.
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def _send_results(conn, outbox: queue.SimpleQueue) -> None:
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except OSError:  # the main process is gone or closed the pipe: nothing left to do
            return


def _worker_main(conn, decoder: Callable[[DecodeTask], Decoded], starved, name: bytes, inherited: list[int]) -> None:
    """Decode the tasks the pipe brings, first in first out, until it closes or brings None.

    Decoding runs on an idle-priority thread while the model keeps the cores busy: at idle priority
    a decoder runs in the gaps the model's threads leave (waiting for each other between layers) and
    is preempted the moment the model wants the core back, whereas at normal priority it preempts a
    model thread and the others wait for it at the next barrier. An unprivileged thread cannot leave
    SCHED_IDLE again, so once the main process reports starvation this thread decodes itself.
    Results go out on a thread of their own, so decoding goes on while the main process is busy.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _name_process(name)
    for fd in inherited:  # the main process's ends of the other workers' pipes: theirs to close
        try:
            os.close(fd)
        except OSError:
            pass
    torch.set_num_threads(1)  # one core per decoder; the model's threads are the main process's
    capture_native_output()  # nothing else writes to this process's fd 2: libtiff's messages are the file's
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_send_results, args=(conn, outbox), daemon=True)
    sender.start()
    idle = ThreadPoolExecutor(1, initializer=_lower_priority) if starved is not None else None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        position, task = message
        try:
            if idle is not None and not starved.value:
                item = idle.submit(decoder, task).result()
            else:
                item = decoder(task)
        except Exception as exc:  # decode_file never raises; a stand-in or a plugin still might
            item = Decoded(task.key, error=f"cannot decode image: {type(exc).__name__}: {exc}", cause=UNDECODABLE)
        if item.pixels is not None:
            item.pixels = item.pixels.numpy()  # by value: nothing shared with a process that may die
        outbox.put((position, time.monotonic(), item))
    outbox.put(None)
    sender.join()
    os._exit(0)  # skip interpreter teardown: nothing of a forked copy of the indexer needs it


# -- in the main process ---------------------------------------------------------------------------

@dataclass
class _Worker:
    process: multiprocessing.Process
    conn: object  # multiprocessing.connection.Connection
    alone: bool  # decodes one file that failed in a worker: its failure is that file's
    held: deque[tuple[int, float]] = field(default_factory=deque)  # (position, sent at), oldest first
    busy_since: float = 0.0  # when it started on held[0]

    def send(self, position: int, task: DecodeTask) -> None:
        self.conn.send((position, task))  # raises OSError if the process is gone
        if not self.held:
            self.busy_since = time.monotonic()
        self.held.append((position, time.monotonic()))

    def answered(self, position: int, finished: float) -> None:
        self.held = deque(h for h in self.held if h[0] != position)
        if self.held:  # the next one started when this one finished, or when it arrived if later
            self.busy_since = max(finished, self.held[0][1])

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _failure(key: int, worker: _Worker, timeout: float, timed_out: bool) -> Decoded:
    if timed_out:
        return Decoded(key, error=f"decoding took over {timeout:g}s (--decode-timeout); skipped", cause=TIMEOUT)
    code = worker.process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return Decoded(key, error=f"the decoder crashed on this file ({how}); skipped", cause=CRASHED)


class _Pool:
    """Worker processes decoding tasks by position; ``imap`` yields their results in task order."""

    def __init__(self, decoder: Callable[[DecodeTask], Decoded], workers: int, timeout: float, prefetch: int,
                 starved) -> None:
        self.decoder, self.size, self.timeout, self.starved = decoder, workers, timeout, starved
        self.prefetch = max(prefetch, workers)
        self.per_worker = -(-self.prefetch // workers)
        self.context = multiprocessing.get_context("fork")  # the decoder as the indexer has it, no pickling
        self.workers: list[_Worker] = []
        self.done: dict[int, Decoded] = {}
        self.retry: deque[int] = deque()  # positions a dead worker held but had not started
        self.alone: deque[int] = deque()  # positions to decode alone
        self.tasks: Sequence[DecodeTask] = ()

    def _start(self, alone: bool) -> _Worker:
        receive, send = self.context.Pipe(duplex=True)
        inherited = [w.conn.fileno() for w in self.workers]
        process = self.context.Process(target=_worker_main, daemon=True,
                                       args=(send, self.decoder, None if alone else self.starved,
                                             ALONE_NAME if alone else WORKER_NAME, inherited))
        process.start()
        send.close()
        worker = _Worker(process, receive, alone)
        self.workers.append(worker)
        return worker

    def imap(self, tasks: Sequence[DecodeTask]) -> Iterator[Decoded]:
        self.tasks = tasks
        try:
            following = 0  # the next position never sent
            for position in range(len(tasks)):
                while position not in self.done:
                    following = self._dispatch(tasks, position, following)
                    self._wait()
                item = self.done.pop(position)
                if isinstance(item.pixels, np.ndarray):
                    item.pixels = torch.from_numpy(item.pixels)
                yield item
        finally:
            for worker in self.workers:
                worker.stop()
            self.workers.clear()

    def _dispatch(self, tasks: Sequence[DecodeTask], position: int, following: int) -> int:
        """Start missing workers and hand out work inside the window [position, position + prefetch)."""
        while self.alone and sum(w.alone for w in self.workers) < self.size:
            p = self.alone.popleft()
            self._send(self._start(alone=True), p)
        regular = [w for w in self.workers if not w.alone]
        for _ in range(self.size - len(regular)):
            regular.append(self._start(alone=False))
        for worker in sorted(regular, key=lambda w: len(w.held)):
            while len(worker.held) < self.per_worker:
                if self.retry:
                    p = self.retry.popleft()
                elif following < min(len(tasks), position + self.prefetch):
                    p, following = following, following + 1
                else:
                    return following
                if not self._send(worker, p):
                    break
        return following

    def _send(self, worker: _Worker, position: int) -> bool:
        try:
            worker.send(position, self.tasks[position])
            return True
        except OSError:  # it died while idle: its tasks go elsewhere, this one too
            self.retry.appendleft(position)
            self._lost(worker, timed_out=False)
            return False

    def _wait(self) -> None:
        """Take in what the workers sent; handle the ones that died or ran out of time."""
        busy = [w for w in self.workers if w.held]
        if not busy:
            return
        deadline = min(w.busy_since for w in busy) + self.timeout
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in self.workers],
                         timeout=max(0.0, deadline - time.monotonic())))
        for worker in list(self.workers):
            pipe_ok = self._receive(worker) if worker.conn in ready else True
            if worker.process.sentinel in ready or not pipe_ok:
                self._receive(worker)  # what it sent before it died still counts
                self._lost(worker, timed_out=False)
            elif worker.held and time.monotonic() - worker.busy_since > self.timeout:
                self._lost(worker, timed_out=True)
            elif worker.alone and not worker.held:  # its one file is done
                worker.stop()
                self.workers.remove(worker)

    def _receive(self, worker: _Worker) -> bool:
        """Read every message the worker has sent so far; False if its pipe broke."""
        try:
            while worker.held and worker.conn.poll(0):
                position, finished, item = worker.conn.recv()
                worker.answered(position, finished)
                self.done[position] = item
        except (EOFError, OSError):
            return False
        return True

    def _lost(self, worker: _Worker, timed_out: bool) -> None:
        worker.stop()
        self.workers.remove(worker)
        if not worker.held:
            return
        (head, _), *rest = worker.held
        self.retry.extendleft(p for p, _ in reversed(rest))  # never started: a worker decodes in order
        if worker.alone:
            self.done[head] = _failure(self.tasks[head].key, worker, self.timeout, timed_out)
        else:
            self.alone.append(head)
