"""Fused queries: a query as a weighted sum of terms (texts, images, indexed items, raw vectors).

Light on purpose (no torch, no faiss): the CLI parses terms and a server's client sends them
without loading a model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.errors import QueryError

KINDS = ("text", "image", "item", "vector")
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Term:
    """One term of a fused query: exactly one of ``text``, ``image`` (a path, or an image already
    opened), ``item`` (an indexed item's id: its stored vector) or ``vector``; and its ``weight``.

    A negative weight means "less like this".
    """

    text: str | None = None
    image: Any = None
    item: int | None = None
    vector: Any = None
    weight: float = 1.0

    @property
    def kind(self) -> str:
        given = [name for name in KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise QueryError("a query term is exactly one of text, image, item or vector" +
                             (f" (this one has {', '.join(given)})" if given else ""))
        return given[0]

    def describe(self) -> str:
        value = {"text": repr(self.text), "image": str(self.image), "item": f"item {self.item}",
                 "vector": "a vector"}[self.kind]
        return f"{self.weight:g}:{value}"


def check_terms(terms: list[Term]) -> None:
    """Refuse what cannot make a query: no terms, a weight that is zero or not finite, no positive term."""
    if not terms:
        raise QueryError("the query has no terms: give a text, an image, an item or a vector")
    for n, term in enumerate(terms, 1):
        kind, weight = term.kind, term.weight  # kind raises for a term with no value or several
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight == 0:
            raise QueryError(f"query term {n} ({kind}): the weight must be a non-zero number, got {weight!r}")
    if not any(term.weight > 0 for term in terms):
        raise QueryError("every query term has a negative weight: give at least one term to search for "
                         "(negative terms only push results away from something)")


def weighted(value: str, negate: bool = False) -> tuple[float, str]:
    """``"2:cat"`` → ``(2.0, "cat")``; ``"cat"`` → ``(1.0, "cat")``; ``"-0.5:fruit"`` → ``(-0.5, "fruit")``.

    Only a number before the first colon is a weight, so ``"note: red"`` or ``C:\\photo.jpg`` stay
    whole. ``negate`` flips the sign (``--not``).
    """
    match = _WEIGHT.match(value)
    weight, rest = (float(match.group(1)), match.group(2)) if match else (1.0, value)
    if not rest.strip():
        raise QueryError(f"query term {value!r} has a weight but nothing to weigh: write WEIGHT:VALUE, e.g. 2:cat")
    return (-weight if negate else weight), rest


def cli_terms(texts=(), images=(), likes=(), nots=()) -> list[Term]:
    """Terms from the command line's repeatable options: ``--text``, ``--image``, ``--like ID`` and
    ``--not TEXT``, each optionally ``WEIGHT:VALUE``."""
    terms = [Term(text=text, weight=w) for w, text in map(weighted, texts)]
    terms += [Term(image=Path(path), weight=w) for w, path in map(weighted, images)]
    for value in likes:
        weight, rest = weighted(value)
        if not rest.strip().isdigit():
            raise QueryError(f"--like takes an item id (a whole number, as search --json shows), got {value!r}")
        terms.append(Term(item=int(rest), weight=weight))
    terms += [Term(text=text, weight=w) for w, text in (weighted(v, negate=True) for v in nots)]
    return terms


def terms_from_json(raw) -> list[Term]:
    """Terms of an API request: ``[{"text": "cat", "weight": 2}, {"item": 7, "weight": -1}, ...]``."""
    if not isinstance(raw, list):
        raise QueryError('terms must be a list such as [{"text": "a cat"}, {"item": 12, "weight": -0.5}]')
    terms = []
    for n, entry in enumerate(raw, 1):
        if not isinstance(entry, dict):
            raise QueryError(f"term {n} must be an object such as {{\"text\": \"a cat\", \"weight\": 2}}")
        unknown = set(entry) - {"text", "item", "vector", "weight"}
        if unknown:
            raise QueryError(f"term {n} has an unknown field {sorted(unknown)[0]!r} (use text, item, vector, weight)")
        text, item, vector = json_values(entry, f"term {n}: ")
        if text is not None and not text.strip():
            raise QueryError(f"term {n}: text must be a non-empty string")
        terms.append(Term(text=text, item=item, vector=vector, weight=entry.get("weight", 1.0)))
    return terms


def json_values(entry: dict, where: str = "") -> tuple[str | None, int | None, list | None]:
    """The ``text``, ``item`` and ``vector`` of a JSON search request or of one of its terms, each
    checked to be of its type; ``where`` starts the messages (``"term 2: "``)."""
    text, item, vector = entry.get("text"), entry.get("item"), entry.get("vector")
    if text is not None and not isinstance(text, str):
        raise QueryError(f"{where}text must be a string")
    if item is not None and (not isinstance(item, int) or isinstance(item, bool)):
        raise QueryError(f"{where}item must be an item id (a whole number)")
    if vector is not None and (not isinstance(vector, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vector)):
        raise QueryError(f"{where}vector must be a list of numbers")
    return text, item, vector
