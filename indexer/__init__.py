"""crossmodal indexer: everything that produces an index (sources, encoder, catalog, FAISS files, pipeline).

Nothing here imports :mod:`retrieval`; the dependency points one way.
"""

from .encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED, Encoder, ModelIdentity, load_encoder, load_encoder_for
from .errors import CrossmodalError
from .pipeline import IndexOptions, IndexSummary, update_index
from .spec import IndexSpec
from .store import DEFAULT_INDEX_DIR, IndexStore

__all__ = [
    "DEFAULT_INDEX_DIR", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "CrossmodalError", "Encoder", "IndexOptions",
    "IndexSpec", "IndexStore", "IndexSummary", "ModelIdentity", "load_encoder", "load_encoder_for", "update_index",
]
