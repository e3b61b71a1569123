"""Domain errors. Each one is a user-facing problem with a message that says what to do.

The CLI turns every subclass of :class:`CrossmodalError` into one line on stderr and a
non-zero exit; anything else escaping is a bug and keeps its traceback.
"""


class CrossmodalError(Exception):
    """Base class of every error a user can cause and fix."""


class IndexNotFound(CrossmodalError):
    pass


class IndexLocked(CrossmodalError):
    pass


class ModelMismatch(CrossmodalError):
    pass


class WeightsUnavailable(CrossmodalError):
    pass


class SourceError(CrossmodalError):
    """A captions/texts file or a root folder that cannot be used."""


class QueryError(CrossmodalError):
    pass


class SchemaError(CrossmodalError):
    pass


class Interrupted(CrossmodalError):
    """The user asked a run to stop (Ctrl-C); what was committed is kept."""


class CatalogError(CrossmodalError):
    """The catalog (``catalog.sqlite``) cannot be used as it is."""


class CatalogDamaged(CatalogError):
    """``catalog.sqlite`` is no longer a sound SQLite database: overwritten, truncated, or another kind of file.

    ``problems`` are what SQLite said (the error, or the first lines of ``PRAGMA quick_check``).
    """

    def __init__(self, path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        # The vectors live in the catalog and the vector files are derived from it, so nothing in the
        # index folder can rebuild it: say so instead of pointing at --repair.
        super().__init__(f"the catalog {self.path} is damaged ({'; '.join(self.problems[:3])}); it holds the "
                         "index's vectors, so `crossmodal verify --repair` cannot rebuild it: restore it from a "
                         "backup, or move the index folder aside and build the index again with `crossmodal index`")


class VectorFileError(CrossmodalError):
    """A vector file (``image.faiss``, ``text.faiss``) that cannot be read: truncated, overwritten, not an index."""
