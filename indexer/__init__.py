"""crossmodal indexer: everything that produces an index (sources, encoder, catalog, FAISS files, pipeline).

Nothing here imports :mod:`retrieval`; the dependency points one way.

The names below are imported on first use, so that reading an index (``crossmodal info``, ``verify``,
``--help``) does not pay for torch and open_clip, which :mod:`indexer.encoder` and the pipeline import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED, Encoder, load_encoder, load_encoder_for
    from .errors import CrossmodalError
    from .identity import ModelIdentity
    from .layout import DEFAULT_INDEX_DIR
    from .pipeline import IndexOptions, IndexSummary, update_index
    from .spec import IndexSpec
    from .store import IndexStore

# Each public name and the module that defines it.
_MODULE_OF = {
    "DEFAULT_INDEX_DIR": "layout", "DEFAULT_MODEL": "encoder", "DEFAULT_PRETRAINED": "encoder",
    "CrossmodalError": "errors", "Encoder": "encoder", "IndexOptions": "pipeline", "IndexSpec": "spec",
    "IndexStore": "store", "IndexSummary": "pipeline", "ModelIdentity": "identity", "load_encoder": "encoder",
    "load_encoder_for": "encoder", "update_index": "pipeline",
}
__all__ = [
    "DEFAULT_INDEX_DIR", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "CrossmodalError", "Encoder", "IndexOptions",
    "IndexSpec", "IndexStore", "IndexSummary", "ModelIdentity", "load_encoder", "load_encoder_for", "update_index",
]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module 'indexer' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
