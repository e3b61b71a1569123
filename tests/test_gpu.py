"""GPU paths: bf16 encoding and nvJPEG decoding on CUDA agree with fp32 and the decoders on the CPU.
Skipped without CUDA."""

import numpy as np
import pytest
import torch
from conftest import make_image

from indexer import IndexOptions, load_encoder, update_index
from retrieval import Searcher

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_cuda_embeddings_match_cpu(tmp_path):
    cpu = load_encoder("crossmodal-tiny", "none", "cpu", "fp32")
    gpu = load_encoder("crossmodal-tiny", "none", "cuda")
    assert gpu.device.type == "cuda" and gpu.precision == "bf16"
    pixels = torch.randn(8, 3, cpu.image_size, cpu.image_size)
    a, b = cpu.encode_images(pixels), gpu.encode_images(pixels)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.sum(a * b, axis=1), 1.0, atol=1e-3)  # bf16: README, Performance
    t = ["a photo of a cat", "two red squares"]
    np.testing.assert_allclose(np.sum(cpu.encode_texts(t) * gpu.encode_texts(t), axis=1), 1.0, atol=1e-3)


def test_index_and_search_on_cuda(tmp_path):
    for i in range(6):
        make_image(tmp_path / "photos" / f"{i}.png", seed=i)
    encoder = load_encoder("crossmodal-tiny", "none", "cuda")
    update_index(tmp_path / "photos", tmp_path / "idx", encoder, IndexOptions(progress=False))
    with Searcher.open(tmp_path / "idx", encoder=encoder) as searcher:
        hit = searcher.search_image(tmp_path / "photos" / "3.png", to="image", k=1)[0]
    assert hit.path.endswith("3.png") and hit.score > 0.99


def test_jpegs_decoded_on_the_gpu_match_the_cpu_decoders(tmp_path):
    """nvJPEG in batches (indexer.devicedecode), the default for a model on CUDA, against the CPU path."""
    from test_devicedecode import PIXEL_TOLERANCE, cpu_path, decoded, jpeg

    from indexer.decode import DecodeTask
    from indexer.devicedecode import iter_decoded_on_device

    encoder = load_encoder("crossmodal-tiny", "none", "cuda")
    tasks = [DecodeTask(i, jpeg(tmp_path / "p" / f"{i}.jpg", (400 + 64 * i, 300), i, orientation=1 + i % 8))
             for i in range(10)]
    tasks.append(DecodeTask(10, make_image(tmp_path / "p" / "x.png", 99)))
    # 47x smaller for the tiny model's 64 px: past what CUDA's antialiased resize does in one step
    tasks.append(DecodeTask(11, jpeg(tmp_path / "p" / "phone.jpg", (4032, 3024), 11, orientation=6)))
    gpu = decoded(iter_decoded_on_device(tasks, encoder.preprocess, encoder.device, cpu_path(encoder), batch_size=4))
    cpu = decoded(cpu_path(encoder)(tasks))
    assert sorted(gpu) == sorted(cpu) == list(range(12))
    for key, item in gpu.items():
        assert (item.width, item.height, item.sha256) == (cpu[key].width, cpu[key].height, cpu[key].sha256)
        assert (item.pixels.cpu() - cpu[key].pixels).abs().max() < PIXEL_TOLERANCE
    assert all(gpu[k].pixels.device.type == "cuda" for k in (*range(10), 11))
    # A truncated JPEG: nvJPEG may fill in what is missing where the CPU decoders refuse it; either way
    # the run goes on and every other file is indexed.
    whole = (tmp_path / "p" / "0.jpg").read_bytes()
    (tmp_path / "p" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    summary = update_index(tmp_path / "p", tmp_path / "idx", encoder, IndexOptions(progress=False, batch_size=4))
    assert summary.added + summary.skipped == 13 and summary.added >= 12


def test_training_with_amp_on_cuda(tmp_path):
    from indexer.pairs import read_pairs
    from indexer.synth import write_corpus
    from indexer.train import TrainOptions, train

    write_corpus(tmp_path / "c", 40, seed=3, test=0, val=8, side=32)
    pairs = read_pairs(tmp_path / "c" / "dataset_synth.json", split="train")
    encoder = load_encoder("crossmodal-tiny", "none", "cuda", "fp32")
    summary = train(encoder, pairs, read_pairs(tmp_path / "c" / "dataset_synth.json", split="val"),
                    TrainOptions(out=tmp_path / "run", batch_size=16, max_steps=4, warmup_steps=1, workers=0,
                                 progress=False))
    assert summary.steps == 4 and np.isfinite(summary.loss)
    assert summary.validation["text_to_image"]["queries"] == 24


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_gpu_search_and_ivf_training_agree_with_the_cpu(kind):
    from indexer.spec import IndexSpec
    from indexer.vectors import VectorStore, gpu_count

    if not gpu_count():
        pytest.skip("faiss has no GPU here (faiss-cpu installed): pip install 'crossmodal-search[gpu]'")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5_000, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    stores = []
    for use_gpu in (False, True):
        store = VectorStore.empty(IndexSpec(kind, params={"nprobe": 8} if kind == "ivf" else {}), 64)
        store.use_gpu = use_gpu
        store.add(np.arange(5_000), base)
        if not store.trained:
            store.train(base)
        stores.append(store)
    cpu, gpu = (s.search(base[:50], 10)[1] for s in stores)
    assert stores[1]._derived is not None  # the search ran on the GPU
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(cpu, gpu)])
    assert overlap >= (0.999 if kind == "flat" else 0.9)
