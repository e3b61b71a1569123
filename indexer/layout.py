"""Where an index lives by default and the names of the files in its directory.

Apart from :mod:`indexer.store` so that the CLI can show its defaults without importing SQLAlchemy and faiss.
"""

from pathlib import Path

MODALITIES = ("image", "text")
CATALOG_FILE = "catalog.sqlite"
LOCK_FILE = ".lock"
DEFAULT_INDEX_DIR = Path(".crossmodal")
