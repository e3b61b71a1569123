"""Fused queries: parsing terms, and a weighted sum of terms through the public API with the real demo model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import QueryError
from retrieval.terms import Term, check_terms, cli_terms, terms_from_json, weighted


def test_a_weight_is_a_number_before_the_first_colon_and_nothing_else():
    assert weighted("2:cat") == (2.0, "cat")
    assert weighted("-0.5:fruit") == (-0.5, "fruit")
    assert weighted(".5:x") == (0.5, "x") and weighted("1e-1:x") == (0.1, "x")
    assert weighted("cat") == (1.0, "cat")
    assert weighted("note: a red dot") == (1.0, "note: a red dot")
    assert weighted("C:\\photos\\a.jpg") == (1.0, "C:\\photos\\a.jpg")
    assert weighted("2:a:b") == (2.0, "a:b")
    assert weighted("fruit", negate=True) == (-1.0, "fruit") and weighted("0.5:fruit", negate=True) == (-0.5, "fruit")
    with pytest.raises(QueryError, match="nothing to weigh"):
        weighted("3:  ")


def test_command_line_terms_and_their_errors():
    terms = cli_terms(texts=["2:a red circle"], images=["-1:q.jpg"], likes=["7", "0.5:9"], nots=["blue"])
    assert terms == [Term(text="a red circle", weight=2.0), Term(image=Path("q.jpg"), weight=-1.0),
                     Term(item=7), Term(item=9, weight=0.5), Term(text="blue", weight=-1.0)]
    with pytest.raises(QueryError, match="--like takes an item id.*'cat'"):
        cli_terms(likes=["cat"])


@pytest.mark.parametrize("terms, says", [
    ([], "no terms"),
    ([Term()], "exactly one of"),
    ([Term(text="a", item=3)], "this one has text, item"),
    ([Term(text="a", weight=0)], "term 1 .text.: the weight must be a non-zero number, got 0"),
    ([Term(text="a"), Term(item=2, weight=math.nan)], "term 2 .item.: the weight"),
    ([Term(text="a", weight=True)], "non-zero number"),
    ([Term(text="a", weight=-1), Term(item=4, weight=-2)], "negative weight"),
])
def test_terms_that_cannot_make_a_query_are_refused_with_a_reason(terms, says):
    with pytest.raises(QueryError, match=says):
        check_terms(terms)


def test_api_terms_are_checked_field_by_field():
    assert terms_from_json([{"text": "cat", "weight": 2}, {"item": 4, "weight": -1}, {"vector": [1, 0]}]) == [
        Term(text="cat", weight=2), Term(item=4, weight=-1), Term(vector=[1, 0])]
    for raw, says in (({"text": "x"}, "must be a list"), (["cat"], "term 1 must be an object"),
                      ([{"text": "x"}, {"image": "a.jpg"}], "term 2 has an unknown field 'image'"),
                      ([{"text": " "}], "non-empty string"), ([{"item": "3"}], "item id"),
                      ([{"vector": [1, "a"]}], "list of numbers")):
        with pytest.raises(QueryError, match=says):
            terms_from_json(raw)


# -- through the Searcher, with the bundled demo model (fixtures shapes, shapes_searcher: conftest.py) ---------
@pytest.mark.slow
@pytest.mark.parametrize("to", ["image", "text"])
def test_a_fused_query_is_the_normalised_weighted_sum_of_its_normalised_terms(shapes_searcher, shapes, to):
    searcher, demo = shapes_searcher, shapes
    image = sorted((demo / "corpus" / "test").glob("*.jpg"))[3]
    item = searcher.answer_text("a blue square", k=1).hits[0].id
    terms = [Term(text="a green triangle", weight=2.0), Term(image=image, weight=0.7), Term(item=item, weight=-0.5),
             Term(vector=np.full(128, 3.0), weight=0.25)]
    encoder = searcher.encoder

    def unit(v):
        v = np.asarray(v, dtype=np.float64).ravel()
        return v / np.linalg.norm(v)

    parts = [unit(encoder.encode_texts(["a green triangle"])), unit(encoder.encode_pil([_rgb(image)])),
             unit(searcher.store.fetch_vectors([item])), unit(np.full(128, 3.0))]
    manual = sum(term.weight * part for term, part in zip(terms, parts))
    fused = searcher.answer_terms(terms, to=to, k=15)
    by_hand = searcher.answer_vector(manual, to=to, k=16)
    expected = [h for h in by_hand.hits if h.id != item][:15]  # items given as terms are left out
    assert [h.id for h in fused.hits] == [h.id for h in expected]
    np.testing.assert_allclose([h.score for h in fused.hits], [h.score for h in expected], atol=1e-5)
    assert item not in {h.id for h in fused.hits} and set(fused.timings) >= {"encode", "catalog", "search"}


def _rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _captions_say(searcher, hit, word: str) -> bool:
    captions = searcher.store.catalog.captions_of([hit.id]).get(hit.id, [])
    return bool(captions) and all(word in text.split() for _, text in captions)


@pytest.mark.slow
@pytest.mark.parametrize("colour", ["red", "blue", "green"])
def test_a_negative_term_pushes_its_concept_down_and_a_positive_one_up(shapes_searcher, colour):
    searcher = shapes_searcher
    n = searcher.store.catalog.counts()["image"]
    plain = searcher.answer_text("a shape", k=n).hits
    coloured = {h.id for h in plain if _captions_say(searcher, h, colour)}  # every caption names the colour
    assert len(coloured) >= 8

    def mean_rank(terms):
        return np.mean([h.rank for h in searcher.answer_terms(terms, k=n).hits if h.id in coloured])

    base = mean_rank([Term(text="a shape")])
    less = mean_rank([Term(text="a shape"), Term(text=f"a {colour} shape", weight=-1)])
    more = mean_rank([Term(text="a shape"), Term(text=f"a {colour} shape", weight=0.5)])
    assert less > base + 8 and more < base - 8, (base, less, more)  # out of 80 images


@pytest.mark.slow
def test_terms_that_cancel_out_are_refused(shapes_searcher):
    searcher = shapes_searcher
    with pytest.raises(QueryError, match="cancel out"):
        searcher.answer_terms([Term(text="a red circle", weight=2), Term(text="a red circle", weight=-2)])
    with pytest.raises(QueryError, match="all zeros"):
        searcher.answer_vector(np.zeros(128))
    with pytest.raises(QueryError, match="no indexed item 999999"):
        searcher.answer_terms([Term(text="a dot"), Term(item=999999, weight=-1)])
