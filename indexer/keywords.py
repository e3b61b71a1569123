"""Keyword search in the catalog: SQLite's FTS5 over captions, texts and images' file and folder names.

The SQL lives here, behind :func:`keyword_matches`, so that PostgreSQL's full-text search can
answer the same call later. The ``item_words`` table and the triggers that keep it in step with
``items`` are catalog migration v4.
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
_MATCH = ("WITH m AS MATERIALIZED (SELECT rowid AS id, bm25(item_words) AS r FROM item_words "
          "WHERE item_words MATCH :query)")
_TO_IMAGE = _MATCH + """
    SELECT CASE WHEN i.kind = 'image' THEN i.id ELSE i.image_id END AS target, MIN(m.r) AS rank
    FROM m JOIN items AS i ON i.id = m.id
    WHERE (i.kind = 'image' OR i.image_id IS NOT NULL) {filtered}
    GROUP BY target ORDER BY rank, target LIMIT :limit
"""
_TO_TEXT = _MATCH + """
    SELECT i.id, m.r AS rank FROM m JOIN items AS i ON i.id = m.id
    WHERE i.kind IN ('caption', 'text') {filtered}
    ORDER BY rank, i.id LIMIT :limit
"""


def fts_query(query: str) -> str | None:
    """The FTS5 expression for what a person typed: each word or "quoted phrase" as an FTS5 string
    (so no character of it is FTS syntax), any of them matching; None when nothing is left to match.

    A word with punctuation, such as ``IMG_1234.jpg``, is a phrase of its parts: it finds that file.
    """
    parts = []
    for quoted, word in _PHRASE.findall(query):
        phrase = quoted if quoted else word
        if not re.search(r"\w", phrase) or (not quoted and phrase.lower() in STOPWORDS):
            continue
        parts.append('"' + phrase.replace('"', '""') + '"')
    return " OR ".join(parts) or None


def keyword_matches(catalog: Catalog, query: str, to: str, limit: int,
                    filters: Filters | None = None) -> list[tuple[int, float]]:
    """Up to ``limit`` (item id, score) pairs, best first; score is -BM25, higher is better.

    ``to="image"``: images whose path under their root or whose captions match (an image scores by
    its best match); ``to="text"``: captions and texts. ``filters``: only images they admit, and
    only captions of such images.
    """
    expression = fts_query(query)
    if expression is None:
        return []
    params: dict = {"query": expression, "limit": int(limit)}
    filtered = ""
    if filters is not None and filters.active:
        admitted, more = admitted_images_sql(filters, image="f", root="fr")
        # the target image of a match: the image itself, or the image a caption belongs to
        filtered = f"AND (CASE WHEN i.kind = 'image' THEN i.id ELSE i.image_id END) IN ({admitted})"
        params = {**params, **more}
    statement = text((_TO_IMAGE if to == "image" else _TO_TEXT).format(filtered=filtered))
    with catalog.engine.connect() as conn:
        rows = conn.execute(statement, params).all()
    return [(int(item_id), -float(rank)) for item_id, rank in rows]
