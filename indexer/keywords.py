"""Keyword search in the catalog: SQLite's FTS5 over captions, texts and images' file and folder names.

The SQL lives here, behind :func:`keyword_matches`, so that PostgreSQL's full-text search can
answer the same call later. The ``item_words`` table and the triggers that keep it in step with
``items`` are catalog migration v4.
"""

from __future__ import annotations

import re

from sqlalchemy import text

from .catalog import Catalog

# Words that match nearly every caption: left out of a keyword query unless quoted, so "a dog on a
# beach" ranks by dog and beach, and the match does not walk every row.
STOPWORDS = frozenset("a an and are as at be by for from in into is it of on or the this to with".split())
_PHRASE = re.compile(r'"([^"]*)"|(\S+)')

# The match is materialised first: bm25() cannot be called inside an aggregate or a flattened join.
_MATCH = ("WITH m AS MATERIALIZED (SELECT rowid AS id, bm25(item_words) AS r FROM item_words "
          "WHERE item_words MATCH :query)")
_TO_IMAGE = text(_MATCH + """
    SELECT CASE WHEN i.kind = 'image' THEN i.id ELSE i.image_id END AS target, MIN(m.r) AS rank
    FROM m JOIN items AS i ON i.id = m.id
    WHERE i.kind = 'image' OR i.image_id IS NOT NULL
    GROUP BY target ORDER BY rank, target LIMIT :limit
""")
_TO_TEXT = text(_MATCH + """
    SELECT i.id, m.r AS rank FROM m JOIN items AS i ON i.id = m.id
    WHERE i.kind IN ('caption', 'text')
    ORDER BY rank, i.id LIMIT :limit
""")


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


def keyword_matches(catalog: Catalog, query: str, to: str, limit: int) -> list[tuple[int, float]]:
    """Up to ``limit`` (item id, score) pairs, best first; score is -BM25, higher is better.

    ``to="image"``: images whose path under their root or whose captions match (an image scores by
    its best match); ``to="text"``: captions and texts.
    """
    expression = fts_query(query)
    if expression is None:
        return []
    statement = _TO_IMAGE if to == "image" else _TO_TEXT
    with catalog.engine.connect() as conn:
        rows = conn.execute(statement, {"query": expression, "limit": int(limit)}).all()
    return [(int(item_id), -float(rank)) for item_id, rank in rows]
