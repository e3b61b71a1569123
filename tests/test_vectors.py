import numpy as np
import pytest

from indexer.errors import CrossmodalError
from indexer.spec import IndexSpec
from indexer.vectors import VectorStore


def unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_spec_round_trips_and_rejects_unknown_kinds():
    spec = IndexSpec()
    assert IndexSpec.from_json(spec.to_json()) == spec
    assert spec.describe() == "flat" and spec.params == {}
    with pytest.raises(CrossmodalError, match="unknown index type"):
        IndexSpec(kind="nope")


def test_flat_search_equals_brute_force():
    base, queries = unit_rows(500, 16, 0), unit_rows(20, 16, 1)
    ids = np.arange(1000, 1500, dtype=np.int64)
    store = VectorStore.empty(IndexSpec(), 16)
    store.add(ids, base)
    scores, found = store.search(queries, 10)
    sims = queries @ base.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), rtol=1e-5, atol=1e-6)


def test_remove_and_sync_with_expected_ids():
    base = unit_rows(10, 8, 2)
    store = VectorStore.empty(IndexSpec(), 8)
    store.add(np.arange(10), base)
    assert store.remove(np.array([3, 4])) == 2
    expected = np.array([0, 1, 2, 5, 6, 7, 8, 9, 42])
    added, removed = store.sync(np.setdiff1d(expected, [9]), lambda ids: unit_rows(len(ids), 8, 3))
    assert (added, removed) == (1, 1)
    assert sorted(store.ids().tolist()) == [0, 1, 2, 5, 6, 7, 8, 42]


def test_save_is_atomic_and_round_trips(tmp_path):
    store = VectorStore.empty(IndexSpec(), 8)
    store.add(np.array([7, 9]), unit_rows(2, 8, 4))
    path = tmp_path / "image.faiss"
    store.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["image.faiss"]  # no temp file left behind
    loaded = VectorStore.load(path, IndexSpec(), 8)
    assert loaded.ids().tolist() == [7, 9]
    np.testing.assert_array_equal(loaded.search(unit_rows(1, 8, 4), 2)[1], store.search(unit_rows(1, 8, 4), 2)[1])


def test_search_on_fewer_vectors_than_k_pads_with_minus_one():
    store = VectorStore.empty(IndexSpec(), 4)
    store.add(np.array([1]), unit_rows(1, 4, 5))
    _, ids = store.search(unit_rows(1, 4, 6), 5)
    assert ids.tolist() == [[1]]
