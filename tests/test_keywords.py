"""Keyword and hybrid search: the FTS5 query, the catalog's words kept in step, and the fused ranking."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from indexer.catalog import SCHEMA_VERSION, Catalog, ImageWrite, TextWrite
from indexer.errors import QueryError
from indexer.keywords import fts_query, keyword_matches
from retrieval.hybrid import reciprocal_rank_fusion

pytestmark = pytest.mark.usefixtures("either_catalog")  # each test on SQLite and on PostgreSQL


def unit(seed, dim=4):
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def catalog(tmp_path, either_catalog):
    cat = Catalog(either_catalog or tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def ids(matches):
    return [item_id for item_id, _ in matches]


def test_what_a_person_types_becomes_quoted_fts_strings():
    assert fts_query("a dog on the beach") == '"dog" OR "beach"'
    assert fts_query('"a red car" at night') == '"a red car" OR "night"'  # a quoted phrase keeps its stopword
    assert fts_query("IMG_1234.jpg") == '"IMG_1234.jpg"'
    assert fts_query('say "hi') == '"say" OR """hi"'
    assert fts_query("the a of") is None and fts_query(" -- * ") is None


def test_captions_texts_and_file_names_are_found_and_follow_every_change(catalog):
    root = catalog.root_id("/photos")
    beach, dog, broken = catalog.write_images(root, [
        ImageWrite("2021/beach_trip/IMG_1234.jpg", 1, 1, "h1", vector=unit(1)),
        ImageWrite("2022/dog.jpg", 1, 1, "h2", vector=unit(2)),
        ImageWrite("2022/sunset.jpg", 1, 1, None, error="cannot decode image"),
    ])
    [caption, text] = catalog.write_texts(root, [
        TextWrite("caption", "a golden retriever asleep", "c1", "sidecar", 1, dog, unit(3)),
        TextWrite("text", "notes about a retriever", "t1", "notes.txt", 1, None, unit(4)),
    ])
    assert ids(keyword_matches(catalog, "IMG_1234.jpg", "image", 10)) == [beach]
    assert ids(keyword_matches(catalog, "beach trip", "image", 10)) == [beach]  # folder names count
    assert ids(keyword_matches(catalog, "retriever", "image", 10)) == [dog]  # through its caption
    assert set(ids(keyword_matches(catalog, "retriever", "text", 10))) == {caption, text}
    assert keyword_matches(catalog, "sunset", "image", 10) == []  # skipped images are not found
    best = keyword_matches(catalog, "golden retriever", "text", 10)
    assert ids(best)[0] == caption and best[0][1] > best[1][1] > 0  # more of the words: a better score
    catalog.write_images(root, [ImageWrite("2021/beach_trip/renamed.jpg", 1, 1, "h1", vector=unit(1), id=beach)])
    assert keyword_matches(catalog, "IMG_1234", "image", 10) == []
    assert ids(keyword_matches(catalog, "renamed", "image", 10)) == [beach]
    catalog.delete_items([dog])  # its caption goes with it
    assert keyword_matches(catalog, "golden", "text", 10) == [] and ids(
        keyword_matches(catalog, "retriever", "text", 10)) == [text]
    assert keyword_matches(catalog, 'NEAR("x" "y") OR *', "text", 10) == []  # FTS syntax is only text


@pytest.mark.sqlite_only
def test_an_index_from_before_keywords_is_searchable_once_upgraded(tmp_path):
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path)
    root = cat.root_id("/r")
    [image] = cat.write_images(root, [ImageWrite("holiday/lake.jpg", 1, 1, "h", vector=unit(1))])
    cat.close()
    con = sqlite3.connect(path)  # back to schema 3, as an index written by the previous release
    v5 = "format taken_at camera_make camera_model orientation gps_lat gps_lon meta_version".split()
    con.executescript("DROP TRIGGER item_words_insert; DROP TRIGGER item_words_delete; "
                      "DROP TRIGGER item_words_update; DROP TABLE item_words; DELETE FROM schema_version "
                      "WHERE version >= 4; DROP INDEX ix_items_taken_at;"
                      + "".join(f"ALTER TABLE items DROP COLUMN {column};" for column in v5))
    con.close()
    cat = Catalog(path)
    try:
        assert cat.schema_version() == SCHEMA_VERSION and ids(keyword_matches(cat, "lake", "image", 5)) == [image]
    finally:
        cat.close()


def test_reciprocal_rank_fusion_is_its_definition():
    rankings = [[5, 3, 9, 1], [3, 7, 5], [1]]
    fused = reciprocal_rank_fusion(rankings, k=60)
    brute = {d: sum(1 / (60 + r.index(d) + 1) for r in rankings if d in r) for r in rankings for d in r}
    assert dict(fused) == pytest.approx(brute)
    assert [d for d, _ in fused] == sorted(brute, key=lambda d: -brute[d]) and fused[0][0] == 3


# -- through the Searcher and the CLI, with the demo model (fixtures shapes, shapes_searcher: conftest.py) --
@pytest.mark.slow
def test_keyword_finds_a_file_by_name_and_hybrid_fuses_both_rankings(shapes_searcher):
    searcher = shapes_searcher
    name = "000042.jpg" if searcher.answer_text("000042.jpg", mode="keyword").hits else "000042.png"
    [hit] = searcher.answer_text(name, k=5, mode="keyword").hits
    assert hit.path.endswith(name) and hit.rank == 1
    query = "a yellow triangle"
    words = keyword_matches(searcher.store.catalog, query, "image", 100)
    model = searcher.answer_text(query, k=100).hits
    expected = reciprocal_rank_fusion([[h.id for h in model], ids(words)])[:10]
    hybrid = searcher.answer_text(query, k=10, mode="hybrid")
    assert [(h.id, h.rank) for h in hybrid.hits] == [(d, n) for n, (d, _) in enumerate(expected, 1)]
    assert [h.score for h in hybrid.hits] == pytest.approx([s for _, s in expected])
    second = searcher.answer_text(query, k=5, offset=5, mode="hybrid").hits
    assert [h.id for h in second] == [h.id for h in hybrid.hits[5:]] and second[0].rank == 6
    texts = searcher.answer_text("yellow triangle", to="text", k=5, mode="keyword").hits
    assert texts and all("yellow" in h.text and "triangle" in h.text for h in texts[:2])
    nothing = searcher.answer_text("zebra", k=5, mode="hybrid")
    assert [h.id for h in nothing.hits] == [h.id for h in searcher.answer_text("zebra", k=5).hits]
    assert any("no caption, text or file name" in note for note in nothing.notes)
    with pytest.raises(QueryError, match="unknown search mode"):
        searcher.answer_text("x", mode="fuzzy")
