"""Every index kind on seeded data: exact where it must be, recall floors against flat where approximate,
consistent ids under add/remove/move, save/load round trips, float queries into binary codes."""

import numpy as np
import pytest

from indexer.errors import CrossmodalError
from indexer.spec import IndexSpec, TooFewVectors, nlist_for
from indexer.tuning import choose, tune, tuning_picks
from indexer.vectors import VectorStore, exact_top_k

DIM, N = 64, 10_000
APPROXIMATE = {  # kind -> (spec params, recall@10 floor against exact on shifted queries)
    "ivf": ({"nprobe": 16}, 0.9),
    "ivfpq": ({"nprobe": 16, "m": 8, "opq": False, "rerank": 100}, 0.9),  # OPQ: its own test
    "hnsw": ({"ef_search": 64}, 0.9),
    "lsh": ({"bits": 256, "rerank": 300}, 0.85),
    "itq": ({"bits": 64, "rerank": 500}, 0.85),
}


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """Clustered corpus vectors and queries from a shifted distribution, as text queries are to images."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, DIM))
    base = unit(centres[rng.integers(0, 40, N)] + rng.standard_normal((N, DIM)) * 0.5)
    shift = rng.standard_normal(DIM) * 0.4
    queries = unit(centres[rng.integers(0, 40, 300)] + rng.standard_normal((300, DIM)) * 0.7 + shift)
    ids = np.arange(5_000, 5_000 + N, dtype=np.int64)
    return base, queries, ids, exact_top_k(queries, base, ids, 10)[1]


def build(kind, params, base, ids):
    store = VectorStore.empty(IndexSpec(kind, params=params), DIM)
    store.stored = dict(zip(ids.tolist(), base))  # what the catalog would hold: full vectors by id
    store.exact = lambda wanted: np.stack([store.stored[int(i)] for i in wanted])
    store.add(ids, base)
    if not store.trained:
        store.train(base)
    return store


def recall(found, truth):
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)]))


def test_flat_equals_brute_force_exactly(data):
    base, queries, ids, _ = data
    scores, found = build("flat", {}, base, ids).search(queries, 10)
    sims = queries @ base.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(APPROXIMATE))
def test_approximate_kinds_meet_a_recall_floor_against_flat(kind, data):
    base, queries, ids, truth = data
    params, floor = APPROXIMATE[kind]
    store = build(kind, params, base, ids)
    scores, found = store.search(queries, 10)
    assert recall(found, truth) >= floor, kind
    if kind != "ivfpq":  # re-ranked and flat-stored kinds return exact inner products for what they find
        expected = np.einsum("qkd,qd->qk", base[found - 5_000], queries)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", *sorted(APPROXIMATE)])
def test_add_remove_and_move_keep_ids_consistent_and_survive_save_and_load(kind, data, tmp_path):
    base, _, ids, _ = data
    params = APPROXIMATE.get(kind, ({}, 0))[0]
    store = build(kind, params, base, ids)
    gone, moved = ids[:300], ids[300:310]
    store.remove(gone)
    store.remove(moved)  # a move is a remove and an add of the same id with its new vector
    new = unit(np.random.default_rng(1).standard_normal((10, DIM)))
    store.add(moved, new)
    store.stored.update(zip(moved.tolist(), new))
    expected = np.setdiff1d(ids, gone)
    assert sorted(store.ids().tolist()) == expected.tolist() and len(store) == len(expected)
    _, found = store.search(base[:300], 5)
    assert not np.isin(found, gone).any()
    _, top = store.search(new, 1)
    assert top[:, 0].tolist() == moved.tolist()

    store.save(tmp_path / "v")
    loaded = VectorStore.load(tmp_path / "v", store.spec, DIM)
    loaded.exact = store.exact
    # The catalog is the truth about which ids live: a loaded HNSW learns its tombstones from it.
    loaded.sync(expected, lambda wanted: pytest.fail("nothing is missing"))
    assert sorted(loaded.ids().tolist()) == expected.tolist()
    probe = base[300:400]
    np.testing.assert_array_equal(loaded.search(probe, 10)[1], store.search(probe, 10)[1])


def test_hnsw_rebuilds_its_graph_once_tombstones_pass_their_share(data):
    base, _, ids, _ = data
    store = build("hnsw", {"tombstones": 0.1}, base[:2000], ids[:2000])
    store.remove(ids[:150])
    assert store.backend.index.ntotal == 2000  # tombstoned, not yet rebuilt
    store.remove(ids[150:250])
    assert store.backend.index.ntotal == 1750 and len(store) == 1750
    assert not np.isin(store.search(base[:250], 10)[1], ids[:250]).any()


def test_binary_codes_are_searched_with_float_queries_and_the_codes_are_small(data):
    base, queries, ids, _ = data
    for kind, bits in (("lsh", 128), ("itq", 64)):  # LSH may use more bits than dimensions
        store = build(kind, {"bits": bits}, base, ids)
        assert store.code_bytes() == bits // 8
        assert store.backend.codes(queries[:3]).shape == (3, bits // 8)
        _, found = store.search(queries[:3], 5)
        assert found.shape == (3, 5) and np.isin(found, ids).all()
    with pytest.raises(CrossmodalError, match="itq learns at most 64 bits"):
        build("itq", {"bits": 128}, base, ids)


def test_kinds_that_learn_refuse_a_corpus_too_small_and_search_exactly_until_trained(data):
    base, queries, ids, truth = data
    store = VectorStore.empty(IndexSpec("ivf"), DIM)
    store.add(ids[:500], base[:500])
    assert not store.trained
    exact = exact_top_k(queries, base[:500], ids[:500], 10)[1]
    np.testing.assert_array_equal(store.search(queries, 10)[1], exact)
    with pytest.raises(TooFewVectors, match="at least 1,000 vectors"):
        store.train(base[:500])


def test_auto_chooses_by_size_and_memory_budget():
    assert choose(50_000, 512).kind == "flat"
    assert choose(1_000_000, 512).kind == "hnsw"
    assert choose(1_000_000, 512, memory_budget=2_200_000_000).kind == "ivf"  # vectors fit, graph links do not
    pq = choose(1_000_000, 512, memory_budget=200_000_000)
    assert pq.kind == "ivfpq" and pq.params["m"] * 1_000_000 <= 200_000_000
    with pytest.raises(CrossmodalError, match="do not fit"):
        choose(1_000_000, 512, memory_budget=1_000_000)
    assert [nlist_for(n) for n in (1_000, 100_000, 1_000_000)] == [16, 1024, 4096]


def test_tuning_picks_the_smallest_setting_that_reaches_the_target(data):
    base, queries, ids, truth = data
    store = build("ivf", {}, base, ids)
    tuning = tune(store, queries, truth, 0.95)
    assert tuning.reached and tuning.recall >= 0.95 and tuning.setting == "nprobe"
    smaller = [v for v in (1, 2, 4, 8, 16, 32, 64, 128) if v < tuning.value]
    for value in smaller:
        assert recall(store.search(queries, 10, nprobe=value)[1], truth) < 0.95
    # Held-out own vectors (no other modality): each query's own id is not an answer.
    picked = tuning_picks(len(base))
    own_queries, exclude = base[picked], ids[picked]
    assert len(own_queries) == 1_000 and len(np.unique(exclude)) == 1_000
    truth_own = exact_top_k(own_queries, base, ids, 10, exclude)[1]
    assert not (truth_own == exclude[:, None]).any()


def test_ivfpq_with_opq_rotation_and_exact_reranking(data):
    base, queries, ids, truth = data
    store = build("ivfpq", {"m": 8, "opq": True, "rerank": 100}, base, ids)
    assert store.code_bytes() == 8
    approximate = recall(store.search(queries, 10, rerank=10)[1], truth)  # PQ scores alone
    reranked = recall(store.search(queries, 10)[1], truth)
    assert reranked >= 0.9 and reranked > approximate
