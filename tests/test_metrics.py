"""recall@k against a brute-force reference written the plain way."""

import numpy as np
import pytest

from indexer.metrics import ann_agreement, first_hit_ranks, positive_ranks, recall_at_k, true_recall


def reference(image_vectors, text_vectors, text_image, k):
    scores = text_vectors @ image_vectors.T
    t2i = []
    for t, row in enumerate(scores):
        top = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        t2i.append(text_image[t] in top)
    i2t = []
    for i, row in enumerate(scores.T):
        mine = [t for t, owner in enumerate(text_image) if owner == i]
        if not mine:
            continue
        top = sorted(range(len(row)), key=lambda t: (-row[t], t))[:k]
        i2t.append(any(t in top for t in mine))
    return float(np.mean(t2i)), float(np.mean(i2t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(40, 8)).astype(np.float32)
    text_image = rng.integers(0, 35, 90)  # some images have no caption, most have several
    texts = images[text_image] + rng.normal(scale=1.5, size=(90, 8)).astype(np.float32)
    result = recall_at_k(images, texts, text_image, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = reference(images, texts, text_image, k)
        assert result["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
        assert result["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
    assert result["image_to_text"]["queries"] == len(set(text_image.tolist()))


def test_ties_go_to_the_earlier_item_and_blocks_do_not_matter():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ranks = first_hit_ranks(queries, gallery, [[0], [1], [2]])
    assert ranks.tolist() == [1, 2, 1]
    assert first_hit_ranks(queries, gallery, [[0], [1], [2]], block=1).tolist() == [1, 2, 1]
    assert first_hit_ranks(queries, gallery, [[1, 0], [], [2]]).tolist() == [1, 4, 1]


def test_ann_agreement_counts_overlap_with_exact_top_k_and_forgives_ties():
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    assert ann_agreement(queries, gallery, np.array([[0, 1]]), (1, 2))["@2"] == 1.0
    assert ann_agreement(queries, gallery, np.array([[0, 2]]), (1, 2))["@2"] == 1.0  # 1 and 2 tie
    result = ann_agreement(queries, gallery, np.array([[3, 0]]), (1, 2))
    assert result == {"@1": 0.0, "@2": 0.5}
    assert ann_agreement(queries, gallery, np.array([[0, -1]]), (2,))["@2"] == 0.5


def test_hand_built_cases_rank_k_exactly_and_one_of_five_captions():
    # Query 0's positive is at rank 3 exactly: in R@3, not in R@2.
    gallery = np.eye(4, dtype=np.float32)
    query = np.array([[0.9, 0.8, 0.7, 0.1]], dtype=np.float32)
    assert first_hit_ranks(query, gallery, [[2]]).tolist() == [3]
    # An image with five captions of which only one scores high: found at R@1 (CLIP-paper recall),
    # while true recall@1 counts one caption of five.
    texts = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [0, 1], [0.6, 0.8]], dtype=np.float32)
    image = np.array([[1.0, 0.0]], dtype=np.float32)
    ranks = positive_ranks(image, texts, [[0, 1, 2, 3, 4]])
    assert ranks[0].tolist() == [1, 3, 4, 5, 6]
    assert true_recall(ranks, (1, 5)) == {"R@1": 0.2, "R@5": 0.8}
    result = recall_at_k(image, texts[:5], [0, 0, 0, 0, 0], ks=(1,))
    assert result["image_to_text"]["R@1"] == 1.0 and result["image_to_text"]["true_recall"]["R@1"] == 0.2
