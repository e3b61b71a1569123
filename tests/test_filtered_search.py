"""Filtered search inside every index kind against a brute-force filtered ground truth, at 50 %, 5 % and
0.1 % of the corpus admitted: flat exact, ANN kinds recall@10 >= 0.95, k results whenever k match."""

import numpy as np
import pytest

from indexer.spec import IndexSpec
from indexer.vectors import EXACT_SHARE, VectorStore, exact_top_k

DIM, N, K = 64, 20_000, 10
OFFSET = 5_000  # ids are not row numbers
SETTINGS = {  # each kind at settings whose unfiltered recall@10 is about 0.95 or better here
    "flat": {},
    "ivf": {"nprobe": 16},
    "ivfpq": {"nprobe": 32, "m": 8, "opq": False, "rerank": 200},
    "hnsw": {"ef_search": 64},
    "lsh": {"bits": 256, "rerank": 300},
    "itq": {"bits": 64, "rerank": 500},
}
SHARES = (0.5, 0.05, 0.001)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((40, DIM))
    base = unit(centres[rng.integers(0, 40, N)] + rng.standard_normal((N, DIM)) * 0.5)
    queries = unit(centres[rng.integers(0, 40, 200)] + rng.standard_normal((200, DIM)) * 0.7
                   + rng.standard_normal(DIM) * 0.4)
    ids = np.arange(OFFSET, OFFSET + N, dtype=np.int64)
    filters = {share: ids[rng.random(N) < share] for share in SHARES}
    return base, queries, ids, filters


@pytest.fixture(scope="module", params=list(SETTINGS))
def store(request, corpus):
    base, _, ids, _ = corpus
    store = VectorStore.empty(IndexSpec(request.param, params=SETTINGS[request.param]), DIM)
    store.exact = stored(base)
    store.add(ids, base)
    if not store.trained:
        store.train(base)
    return store


def stored(base):
    """Full vectors by id, as the catalog gives them: NaN rows for ids it does not hold."""
    def exact(wanted):
        rows = np.asarray(wanted) - OFFSET
        held = (rows >= 0) & (rows < len(base))
        out = np.full((len(rows), DIM), np.nan, dtype=np.float32)
        out[held] = base[rows[held]]
        return out
    return exact


def filtered_truth(queries, base, allowed, k=K):
    return exact_top_k(queries, base[allowed - OFFSET], allowed, k)


@pytest.mark.parametrize("share", SHARES)
def test_filtered_search_finds_the_filtered_truth_with_k_results(store, corpus, share):
    base, queries, _, filters = corpus
    allowed = filters[share]
    assert len(allowed) >= K
    truth_scores, truth = filtered_truth(queries, base, allowed)
    scores, found = store.search(queries, K, allowed=allowed)
    assert (found >= 0).all(), "a filter admitting k or more vectors must give k results"
    assert np.isin(found, allowed).all()
    if store.spec.kind == "flat" or share <= EXACT_SHARE:
        np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(truth, axis=1))
        np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-6)
    else:
        recall = np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)])
        assert recall >= 0.95, f"{store.spec.kind} at {share:.1%}: recall@10 {recall:.3f}"


def test_a_filter_admitting_fewer_than_k_gives_just_those(store, corpus):
    base, queries, ids, _ = corpus
    allowed = ids[[3, 500, 19_999]]
    _, found = store.search(queries[:5], K, allowed=np.concatenate([allowed, [10**9]]))  # one id not held
    assert (np.sort(found[:, :3], axis=1) == np.sort(allowed)).all() and (found[:, 3:] == -1).all()
    _, none = store.search(queries[:2], K, allowed=np.zeros(0, dtype=np.int64))
    assert (none == -1).all()


@pytest.mark.parametrize("kind, from_catalog", [("hnsw", False), ("lsh", True)])
def test_the_selective_path_is_exact_and_reads_only_the_admitted_vectors(corpus, kind, from_catalog):
    """Kinds that hold full vectors give them from the index; code-only kinds ask the catalog once."""
    base, queries, ids, filters = corpus
    store = VectorStore.empty(IndexSpec(kind, params={"ef_search": 16} if kind == "hnsw" else {}), DIM)
    store.add(ids, base)
    store.train(base)
    asked = []
    store.exact = lambda wanted: asked.append(len(wanted)) or stored(base)(wanted)
    allowed = filters[0.001]
    _, found = store.search(queries, K, allowed=allowed)
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(filtered_truth(queries, base, allowed)[1], axis=1))
    assert asked == ([len(allowed)] if from_catalog else [])


def test_removed_ids_stay_out_of_filtered_results(corpus):
    base, queries, ids, filters = corpus
    for kind in ("flat", "hnsw"):
        store = VectorStore.empty(IndexSpec(kind), DIM)
        store.add(ids, base)
        allowed = filters[0.05]
        store.remove(allowed[:100])
        _, found = store.search(queries[:20], K, allowed=allowed)
        assert not np.isin(found, allowed[:100]).any() and (found >= 0).all()


def test_a_store_not_yet_trained_filters_its_held_vectors(corpus):
    base, queries, ids, filters = corpus
    store = VectorStore.empty(IndexSpec("ivf"), DIM)
    store.add(ids[:500], base[:500])
    allowed = ids[:500][::7]
    _, found = store.search(queries[:10], K, allowed=allowed)
    np.testing.assert_array_equal(found, filtered_truth(queries[:10], base, allowed)[1])


def test_flat_over_a_broad_filter_is_exact_even_when_the_admitted_are_the_farthest(corpus):
    base, queries, ids, _ = corpus
    store = VectorStore.empty(IndexSpec("flat"), DIM)
    store.add(ids, base)
    far = ids[np.argsort(base @ queries[0])[:N * 3 // 10]]  # 30 % admitted: past the over-fetch share
    for allowed in (far, ids[::2]):
        scores, found = store.search(queries[:4], K, allowed=allowed)
        truth_scores, truth = filtered_truth(queries[:4], base, np.sort(allowed))
        np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(truth, axis=1))
        np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-6)
