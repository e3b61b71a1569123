"""crossmodal retrieval: everything that answers from an index (searcher, CLI).

``Searcher`` and ``Hit`` are imported lazily so that ``retrieval.cli`` can set process-wide
options (OpenMP's wait policy) before torch is first imported.
"""

__all__ = ["Hit", "Searcher"]


def __getattr__(name: str):
    if name in __all__:
        from . import searcher

        return getattr(searcher, name)
    raise AttributeError(f"module 'retrieval' has no attribute '{name}'")
