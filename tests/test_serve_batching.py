"""The server's encoding thread: batches what waits, gives each query its own vectors, isolates failures."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from indexer.identity import ModelIdentity
from retrieval.serve.batching import BatchingEncoder


def vector_of(item) -> list[float]:
    return [len(str(item)), sum(map(ord, str(item)))]


class FakeEncoder:
    """A vector per input that names it; the first call waits for ``gate`` so that others queue up."""

    identity = ModelIdentity(name="fake", pretrained="none", embed_dim=2)
    image_size = 32

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.calls, self.threads = gate, [], set()
        self.started = threading.Event()

    def _encode(self, items) -> np.ndarray:
        self.threads.add(threading.get_ident())
        self.calls.append(list(items))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if any(item == "bad" for item in items):
            raise ValueError("cannot encode 'bad'")
        return np.array([vector_of(item) for item in items], dtype=np.float32)

    def encode_texts(self, texts):
        return self._encode(texts)

    def encode_pil(self, images):
        return self._encode(images)

    def text_overflow(self, text):
        return 0


def test_loading_and_encoding_happen_in_one_thread_that_is_not_the_callers():
    fake = FakeEncoder()
    loaded_in = []
    batching = BatchingEncoder(lambda: loaded_in.append(threading.get_ident()) or fake)
    try:
        assert batching.identity == fake.identity and batching.image_size == 32
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: batching.encode_texts([f"t{i}"]), range(9)))
        assert fake.threads == set(loaded_in) and threading.get_ident() not in fake.threads
    finally:
        batching.close()


@contextmanager
def busy_encoder(workers: int):
    """An encoder whose first call waits until ``release(n)``: what is submitted meanwhile queues up.

    Yields (fake, batching, pool, release); ``release(n)`` waits for n queued jobs, then lets all run.
    """
    gate = threading.Event()
    fake = FakeEncoder(gate)
    batching = BatchingEncoder(lambda: fake)
    try:
        with ThreadPoolExecutor(workers) as pool:
            first = pool.submit(batching.encode_texts, ["first"])
            assert fake.started.wait(30)

            def release(queued: int) -> None:
                while batching._jobs.qsize() < queued:  # everyone is queued behind the first call
                    threading.Event().wait(0.01)
                gate.set()
                assert first.result(30).shape == (1, 2)

            yield fake, batching, pool, release
    finally:
        gate.set()
        batching.close()


def test_what_waits_is_encoded_as_one_batch_and_each_gets_its_own_rows():
    with busy_encoder(6) as (fake, batching, pool, release):
        texts = [[f"q{i}", f"q{i}-second"] for i in range(4)]
        rest = [pool.submit(batching.encode_texts, pair) for pair in texts]
        image = pool.submit(batching.encode_pil, ["img"])
        release(5)
        for pair, future in zip(texts, rest):
            assert future.result(30).tolist() == [vector_of(t) for t in pair]
        assert image.result(30).shape == (1, 2)
    assert fake.calls[1] == [t for pair in texts for t in pair]  # one batch of every waiting text
    assert fake.calls[2] == ["img"]  # images apart from texts


def test_a_bad_input_fails_its_own_query_only():
    with busy_encoder(4) as (_fake, batching, pool, release):
        good = pool.submit(batching.encode_texts, ["good"])
        bad = pool.submit(batching.encode_texts, ["bad"])
        release(2)
        assert good.result(30).shape == (1, 2)
        with pytest.raises(ValueError, match="cannot encode 'bad'"):
            bad.result(30)


def test_a_failed_load_is_raised_to_the_caller_and_a_closed_encoder_refuses_work():
    def broken():
        raise OSError("no weights here")

    with pytest.raises(OSError, match="no weights here"):
        BatchingEncoder(broken)
    batching = BatchingEncoder(FakeEncoder)
    batching.close()
    with pytest.raises(RuntimeError, match="closed"):
        batching.encode_texts(["late"])
