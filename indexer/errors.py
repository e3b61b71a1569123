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
