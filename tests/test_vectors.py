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


@pytest.mark.parametrize("nq", [1, 3, 19, 20, 40])
def test_flat_few_and_many_queries_agree_with_faiss_own_scan(nq):
    """Under 20 queries a flat index scores by a BLAS product (Flat._few_queries), from 20 by faiss's
    blocked search: both must give faiss's exact answer, ties (duplicated vectors) and k > n included."""
    import faiss

    base = unit_rows(300, 16, 7)
    base[10:20] = base[0]  # ties: the same vector under eleven ids
    ids = np.arange(5000, 5300, dtype=np.int64)[::-1].copy()  # ids not in row order
    store = VectorStore.empty(IndexSpec(), 16)
    store.add(ids, base)
    store.remove(ids[[3, 250]])
    keep = np.ones(300, bool)
    keep[[3, 250]] = False
    reference = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    reference.add_with_ids(base[keep], ids[keep])
    true_score = dict(zip(ids[keep].tolist(), base[keep]))
    queries = np.concatenate([base[:1], unit_rows(nq - 1, 16, 8)])
    for k in (1, 5, 12, 400):
        scores, found = store.search(queries, k)
        want_scores, want_ids = reference.search(queries, min(k, 298))
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
        for q, (row_scores, row_ids) in enumerate(zip(scores, found)):
            assert len(set(row_ids.tolist())) == len(row_ids)
            np.testing.assert_allclose([true_score[i] @ queries[q] for i in row_ids], row_scores, atol=1e-5)
            # Above the last score the items are determined; at it, ties may be cut differently.
            last = row_scores[-1] + 1e-5
            assert set(row_ids[row_scores > last]) == set(want_ids[q][want_scores[q] > last])
