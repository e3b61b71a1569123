"""Late fusion of an image's vector and its text: each fusion by its definition, and eval --fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli import cli
from retrieval.fusion import fused_scores, recall_at


def test_each_fusion_is_its_definition():
    rng = np.random.default_rng(0)
    s_image, s_text = rng.uniform(-1, 1, (5, 7)), rng.uniform(-1, 1, (5, 7))
    np.testing.assert_allclose(fused_scores(s_image, s_text, "weighted", 0.3), 0.3 * s_image + 0.7 * s_text)
    for q in range(5):
        for i in range(7):
            pair = np.array([s_image[q, i], s_text[q, i]])
            w = np.exp(pair / 0.05) / np.exp(pair / 0.05).sum()
            assert fused_scores(s_image, s_text, "attention", 0.05)[q, i] == pytest.approx(w @ pair)
            rank_image = 1 + sum(s_image[q, j] > s_image[q, i] for j in range(7))
            rank_text = 1 + sum(s_text[q, j] > s_text[q, i] for j in range(7))
            assert fused_scores(s_image, s_text, "rrf")[q, i] == pytest.approx(1 / (60 + rank_image) +
                                                                                 1 / (60 + rank_text))


def test_recall_counts_a_query_when_its_image_ranks_within_k():
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.5, 0.5], [0.1, 0.2, 0.3]])
    truth = np.array([0, 2, 0])  # ranks 1; 2 (tied with an earlier column, it ranks after it); 3
    assert recall_at(scores, truth, (1, 2, 3)) == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3),
                                                   "R@3": 1.0}


@pytest.mark.slow
def test_eval_fusion_reports_every_method_and_a_fusion_beats_the_image_alone(shapes):
    result = CliRunner().invoke(cli, ["eval", "--fusion", "--index", str(shapes / "index"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 80 and report["queries"] == 160  # 3 captions each: 1 document, 2 queries
    table = report["table"]
    assert {"image only", "text only", "rrf", "weighted a=0.5", "attention t=0.03"} <= set(table)
    best = max(row["R@1"] for label, row in table.items() if label not in ("image only", "text only"))
    assert best > table["image only"]["R@1"]
    human = CliRunner().invoke(cli, ["eval", "--fusion", "--index", str(shapes / "index")]).output
    assert "<- best" in human and "image only" in human


@pytest.mark.slow
def test_fused_search_scores_each_image_with_its_captions_as_defined(shapes_searcher):
    from indexer.errors import QueryError
    from retrieval.fusion import DEFAULT_FUSION
    from retrieval.terms import Term

    searcher = shapes_searcher
    catalog = searcher.store.catalog
    q = searcher.query_vector([Term(text="a yellow triangle")])
    image_ids = catalog.vector_ids("image").tolist()  # 80 images: every one is a candidate
    captions = catalog.captions_of(image_ids)
    s_image = searcher.store.fetch_vectors(image_ids) @ q
    s_text = np.array([max(float(searcher.store.fetch_vectors([c])[0] @ q) for c, _ in captions[i])
                       for i in image_ids])
    expected = fused_scores(s_image[None], s_text[None], *DEFAULT_FUSION)[0]
    order = [image_ids[n] for n in np.argsort(-expected, kind="stable")][:12]
    answer = searcher.answer_text("a yellow triangle", k=12, mode="fused")
    assert [h.id for h in answer.hits] == order and [h.rank for h in answer.hits] == list(range(1, 13))
    assert [h.id for h in searcher.answer_text("a yellow triangle", k=4, offset=8, mode="fused").hits] == order[8:]
    with pytest.raises(QueryError, match="finds images"):
        searcher.answer_text("x", to="text", mode="fused")
