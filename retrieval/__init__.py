"""crossmodal retrieval: everything that answers from an index (searcher, CLI)."""

from .searcher import Hit, Searcher

__all__ = ["Hit", "Searcher"]
