"""One encoding thread for a whole server: every core for each batch, and queries that wait batched.

torch gives each thread that calls it an OpenMP team of its own, and an idle team's threads spin
for a while after each op. Query workers that each encode therefore either split the cores (a lone
ViT-B-32 text query: 78 ms on 1 of 2 cores against 50 ms on both) or fight over them (every encode
3x slower). So the workers hand their encodes to one thread that has every core, and what queued up
while it worked is encoded next as one batch, which costs far less than its queries one by one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

MAX_BATCH = 32  # texts or images encoded at once: a bound on the batch's memory and its wait


@dataclass
class _Job:
    kind: str  # text or image
    items: list
    future: Future = field(default_factory=Future)


class BatchingEncoder:
    """Stands in for an :class:`~indexer.encoder.Encoder` wherever queries encode one at a time.

    ``encode_texts`` and ``encode_pil`` block their caller until the encoding thread has done them;
    the vectors are the encoder's. A batch that fails is encoded again query by query, so a bad input
    fails only its own query.
    """

    def __init__(self, load: Callable[[], object], max_batch: int = MAX_BATCH):
        """``load()`` returns the encoder; it runs in the encoding thread (see :meth:`_run`), and what it
        raises is raised here."""
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(load, loaded), name="cm-encode", daemon=True)
        self._thread.start()
        self.encoder = loaded.result()
        self.identity, self.image_size = self.encoder.identity, self.encoder.image_size

    def text_overflow(self, text: str) -> int:
        return self.encoder.text_overflow(text)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._submit("text", list(texts))

    def encode_pil(self, images: Sequence) -> np.ndarray:
        return self._submit("image", list(images))

    def _submit(self, kind: str, items: list) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the encoder is closed")
        job = _Job(kind, items)
        self._jobs.put(job)
        return job.future.result()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread once the queued work is done, and wait for it; later encodes raise.

        Waiting matters: a thread that has run torch and still winds down while the interpreter
        exits can abort the process ("terminate called without an active exception").
        """
        self._closed = True
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self, load: Callable[[], object], loaded: Future) -> None:
        # The model loads in this thread too: a thread that runs torch ops keeps an OpenMP team, and
        # with more team threads than cores libgomp stops spinning between ops (every encode then
        # took 2.3x as long).
        try:
            self.encoder = load()
        except BaseException as exc:
            loaded.set_exception(exc)
            return
        loaded.set_result(self.encoder)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            jobs, size, stop = [job], len(job.items), False
            while size < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
                size += len(more.items)
            for kind in ("text", "image"):
                group = [j for j in jobs if j.kind == kind]
                if group:
                    self._encode(kind, group)
            if stop:
                break
        while True:  # what came after close: fail it rather than leave its caller waiting
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.set_exception(RuntimeError("the encoder is closed"))

    def _encode(self, kind: str, group: list[_Job]) -> None:
        encode = self.encoder.encode_texts if kind == "text" else self.encoder.encode_pil
        try:
            vectors = encode([item for job in group for item in job.items])
        except BaseException as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for job in group:  # find whose input failed: the others still get their vectors
                self._encode(kind, [job])
            return
        start = 0
        for job in group:
            job.future.set_result(vectors[start:start + len(job.items)])
            start += len(job.items)
