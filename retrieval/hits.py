"""What a search answers: light dataclasses, so that asking a running server needs no model or faiss."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MAX_K = 10_000  # the deepest rank a search answers


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    kind: str  # image, caption or text
    path: str | None  # absolute path of the image (a caption's image for captions)
    text: str | None
    image_id: int | None = None
    source: str | None = None  # where a caption or text came from

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """One query's hits and what goes with them; nothing of it stays on the :class:`Searcher`."""

    hits: list[Hit]
    notes: list[str] = field(default_factory=list)  # what the user should know (a cut query, a damaged file)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, search, catalog
    has_more: bool = False  # a later page (offset + k) holds more hits
    # The catalog's views of the hits, by id, as read for this answer: a server shows their sizes and
    # folders without reading them again.
    items: dict = field(default_factory=dict, repr=False, compare=False)
