"""--engine ray on a local Ray: the same items and vectors as the local engine, and a killed run resumes from
the embedding shards it wrote instead of encoding them again."""

import os

import numpy as np
import pytest

from indexer import IndexOptions, IndexStore, update_index
from indexer.synth import write_corpus

pytestmark = pytest.mark.slow

try:
    import ray
except ImportError:  # pragma: no cover - the [distributed] extra is part of make install
    ray = None
    if os.environ.get("CI"):
        raise
    pytest.skip("Ray is not installed: pip install 'crossmodal-search[distributed]'", allow_module_level=True)


@pytest.fixture(scope="module")
def local_ray():
    # One local Ray for the module (each run would otherwise start and stop its own); 2 CPUs as on our
    # machines, so the encoder actor takes one and decoding the other.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder():
    from indexer.encoder import default_pretrained, load_encoder

    return load_encoder("crossmodal-demo", default_pretrained("crossmodal-demo"), "cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, n=20, seed=9, test=20, val=0)
    (root / "test" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped by both engines alike
    return root / "test"


def opts(**kw):
    return IndexOptions(**{"workers": 0, "batch_size": 8, "flush_seconds": 0, **kw})


def vectors_by_path(index_dir):
    with IndexStore.open(index_dir) as store:
        images = {v.id: v for v in store.catalog.images()}
        ids = store.catalog.vector_ids("image")
        found = dict(zip((images[i].path for i in ids), store.fetch_vectors(ids)))
        skipped = sorted(v.path for v in store.catalog.skipped())
        counts = store.catalog.counts()
    return found, skipped, counts


def test_ray_gives_the_local_engine_s_items_and_vectors(tmp_path, local_ray, encoder, corpus):
    local = update_index(corpus, tmp_path / "local", encoder, opts())
    distributed = update_index(corpus, tmp_path / "ray", encoder, opts(engine="ray"))
    assert (distributed.added, distributed.skipped, distributed.encoded_images) == (local.added, local.skipped, 20)
    assert distributed.stages["encode"] > 0 and distributed.images_per_second > 0
    (a, a_skipped, a_counts), (b, b_skipped, b_counts) = vectors_by_path(tmp_path / "local"), \
        vectors_by_path(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 20 and a_skipped == b_skipped == [str(corpus / "broken.jpg")]
    assert a_counts == b_counts
    assert max(float(np.abs(a[p] - b[p]).max()) for p in a) <= 1e-5
    assert not (tmp_path / "ray" / "ray-shards").exists()  # ingested: the shards are gone
    again = update_index(corpus, tmp_path / "ray", encoder, opts(engine="ray"))
    assert (again.added, again.encoded_images, again.unchanged) == (0, 0, 20)


def test_a_killed_run_ingests_its_written_shards_without_encoding_them(tmp_path, local_ray, encoder, corpus,
                                                                       monkeypatch):
    import indexer.distributed
    import indexer.pipeline

    monkeypatch.setattr(indexer.distributed, "SHARD_IMAGES", 6)  # 21 files: shards of 6, 6, 6, 3
    real_write, calls = indexer.pipeline.write_batch, []

    def killed_at_the_second_ingest(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # shard 2 is on disk, not in the catalog: as if the process died here
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(indexer.pipeline, "write_batch", killed_at_the_second_ingest)
    with pytest.raises(KeyboardInterrupt):
        update_index(corpus, tmp_path / "idx", encoder, opts(engine="ray"))
    assert len(list((tmp_path / "idx" / "ray-shards" / "metadata").glob("*.parquet"))) >= 2
    monkeypatch.setattr(indexer.pipeline, "write_batch", real_write)
    resumed = update_index(corpus, tmp_path / "idx", encoder, opts(engine="ray"))
    # 15 files left: the 6 of the written shard come from disk, only the other 9 are decoded and encoded
    # (encoding everything left again would be 14: all but the broken file)
    assert resumed.from_shards == 6 and resumed.encoded_images <= 9 and resumed.added + resumed.skipped == 15
    found, skipped, counts = vectors_by_path(tmp_path / "idx")
    assert len(found) == 20 and counts["image"] == 21 and skipped == [str(corpus / "broken.jpg")]
    reference = update_index(corpus, tmp_path / "local", encoder, opts())
    assert reference.added == 21 - 1 and vectors_by_path(tmp_path / "local")[0].keys() == found.keys()
    assert not (tmp_path / "idx" / "ray-shards").exists()


def test_shards_written_in_ray_tasks_make_the_index_the_local_engine_makes(local_ray, tmp_path):
    from indexer.build import reindex
    from indexer.embeddings import import_embeddings
    from indexer.identity import ModelIdentity
    from indexer.spec import IndexSpec
    from indexer.vectors import VectorStore

    rng = np.random.default_rng(5)
    emb = tmp_path / "emb"
    for name in ("img_emb", "text_emb", "metadata"):
        (emb / name).mkdir(parents=True)
    vectors = rng.standard_normal((3_000, 16)).astype(np.float32)
    np.save(emb / "img_emb" / "img_emb_0.npy", vectors)
    (emb / "metadata" / "metadata_0.jsonl").write_text("".join(f'{{"image_path": "/p/{i}.jpg"}}\n'
                                                               for i in range(3_000)))
    identity = ModelIdentity("fake", "none", 16)
    spec = IndexSpec("ivf", params={"nlist": 32, "shards": 3})
    found = {}
    for engine in ("local", "ray"):
        index = tmp_path / engine
        import_embeddings(emb, index, identity)
        reindex(index, spec, "cpu", engine=engine)
        with IndexStore.open(index) as store:
            held = store.load_vectors("image")[0]
            assert held.on_disk and len(held) == 3_000
            found[engine] = held.search(vectors[:50], 10, nprobe=8)
    assert (found["ray"][1] == found["local"][1]).all()  # same training, same shards: the same index
    assert isinstance(held, VectorStore) and not list((tmp_path / "ray").glob(".image-shards-*"))
