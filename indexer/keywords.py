"""Keyword search in the catalog over captions, texts and images' file and folder names.

SQLite answers with FTS5 (the ``item_words`` table and the triggers that keep it in step with
``items``), PostgreSQL with its full-text search (a GIN index over the same words); both are made
by migration step "keywords" (:mod:`indexer.dialects`). The SQL lives here, behind :func:`keyword_matches`.
"""

from __future__ import annotations

import re

from sqlalchemy import text

from .catalog import Catalog
from .filters import Filters, admitted_images_sql

# Words that match nearly every caption: left out of a keyword query unless quoted, so "a dog on a
# beach" ranks by dog and beach, and the match does not walk every row.
STOPWORDS = frozenset("a an and are as at be by for from in into is it of on or the this to with".split())
_PHRASE = re.compile(r'"([^"]*)"|(\S+)')

# The match is materialised first: bm25() cannot be called inside an aggregate or a flattened join.
# Both dialects give m(id, r): the matching items and a rank, lower is better.
_MATCH_SQLITE = ("WITH m AS MATERIALIZED (SELECT rowid AS id, bm25(item_words) AS r FROM item_words "
                 "WHERE item_words MATCH :query)")
# PostgreSQL: the GIN index of migration step "keywords" (indexer.dialects.PostgreSQL.WORDS), any phrase.
_MATCH_POSTGRES = ("WITH q AS (SELECT {tsquery} AS q), m AS MATERIALIZED (SELECT i.id, -ts_rank({words}, q.q) AS r "
                   "FROM items AS i, q WHERE i.error IS NULL AND {words} @@ q.q)")
_TO_IMAGE = """
    SELECT CASE WHEN i.kind = 'image' THEN i.id ELSE i.image_id END AS target, MIN(m.r) AS rank
    FROM m JOIN items AS i ON i.id = m.id
    WHERE (i.kind = 'image' OR i.image_id IS NOT NULL) {filtered}
    GROUP BY target ORDER BY rank, target LIMIT :limit
"""
_TO_TEXT = """
    SELECT i.id, m.r AS rank FROM m JOIN items AS i ON i.id = m.id
    WHERE i.kind IN ('caption', 'text') {filtered}
    ORDER BY rank, i.id LIMIT :limit
"""


def query_phrases(query: str) -> list[str]:
    """What a person typed as the words and "quoted phrases" to match, any of them; stopwords (unquoted)
    and bare punctuation left out."""
    phrases = []
    for quoted, word in _PHRASE.findall(query):
        phrase = quoted if quoted else word
        if re.search(r"\w", phrase) and (quoted or phrase.lower() not in STOPWORDS):
            phrases.append(phrase)
    return phrases


def fts_query(query: str) -> str | None:
    """The FTS5 expression for what a person typed: each of its :func:`query_phrases` as an FTS5 string
    (so no character of it is FTS syntax), any of them matching; None when nothing is left to match.

    A word with punctuation, such as ``IMG_1234.jpg``, is a phrase of its parts: it finds that file.
    """
    return " OR ".join('"' + phrase.replace('"', '""') + '"' for phrase in query_phrases(query)) or None


def _match(dialect, query: str) -> tuple[str, dict] | None:
    """The dialect's ``WITH m`` clause for ``query`` and its parameters; None when nothing is left to match."""
    if dialect.name == "sqlite":
        expression = fts_query(query)
        return None if expression is None else (_MATCH_SQLITE, {"query": expression})
    phrases = query_phrases(query)
    if not phrases:
        return None
    # split at punctuation as the indexed words are, so a phrase's parts must follow each other
    tsquery = " || ".join(f"phraseto_tsquery('simple', regexp_replace(:phrase{n}, '[^[:alnum:]]+', ' ', 'g'))"
                          for n in range(len(phrases)))
    sql = _MATCH_POSTGRES.format(tsquery=tsquery, words=dialect.WORDS.format(t="i."))
    return sql, {f"phrase{n}": phrase for n, phrase in enumerate(phrases)}


def keyword_matches(catalog: Catalog, query: str, to: str, limit: int,
                    filters: Filters | None = None) -> list[tuple[int, float]]:
    """Up to ``limit`` (item id, score) pairs, best first; higher scores are better (-BM25 on SQLite,
    PostgreSQL's ts_rank).

    ``to="image"``: images whose path under their root or whose captions match (an image scores by
    its best match); ``to="text"``: captions and texts. ``filters``: only images they admit, and
    only captions of such images.
    """
    match = _match(catalog.dialect, query)
    if match is None:
        return []
    with_clause, params = match
    params = {**params, "limit": int(limit)}
    filtered = ""
    if filters is not None and filters.active:
        admitted, more = admitted_images_sql(filters, catalog.dialect, image="f", root="fr")
        # the target image of a match: the image itself, or the image a caption belongs to
        filtered = f"AND (CASE WHEN i.kind = 'image' THEN i.id ELSE i.image_id END) IN ({admitted})"
        params = {**params, **more}
    statement = text(with_clause + (_TO_IMAGE if to == "image" else _TO_TEXT).format(filtered=filtered))
    with catalog.engine.connect() as conn:
        rows = conn.execute(statement, params).all()
    return [(int(item_id), -float(rank)) for item_id, rank in rows]
