"""Where an index, datasets and caches live by default, and the names of the files in an index's directory.

Apart from :mod:`indexer.store` so that the CLI can show its defaults without importing SQLAlchemy and faiss.
"""

import os
from collections.abc import Mapping
from pathlib import Path

MODALITIES = ("image", "text")
CATALOG_FILE = "catalog.sqlite"
LOCK_FILE = ".lock"
LIST_FILE_SUFFIX = ".ivfdata"  # an on-disk index's lists: image.<writer>.ivfdata beside image.faiss
DEFAULT_INDEX_DIR = Path(".crossmodal")

DATA_ENV = "CROSSMODAL_DATA"
CACHE_ENV = "CROSSMODAL_CACHE"
# What marks the folder above the package as our checkout: a wheel's site-packages has neither.
_SETUP_CFG = "setup.cfg"
_PROJECT_NAME = "crossmodal-search"
_DATA_README = Path("data") / "README.md"


def checkout_data_dir(package_dir: Path | None = None) -> Path | None:
    """The ``data/`` folder of the source checkout that ``package_dir`` (default: this package) runs from.

    None when there is none, as for an installed wheel. Only the folder right above the package is looked
    at, never its parents: a wheel installed into a virtualenv inside a checkout (``.venv/lib/.../
    site-packages``) would otherwise take that checkout's data for its own. The folder must hold our
    ``setup.cfg`` and ``data/README.md``, so another project's checkout, or one whose data folder was
    removed, is not written into.
    """
    import configparser

    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).parent
    try:
        root = package_dir.resolve().parent
    except (OSError, RuntimeError):
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(root / _SETUP_CFG, encoding="utf-8")
        name = parser.get("metadata", "name", fallback=None)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    if name != _PROJECT_NAME or not (root / _DATA_README).is_file():
        return None
    return root / _DATA_README.parent


def data_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where datasets live: ``$CROSSMODAL_DATA`` when set, else the checkout's ``data/``, else None."""
    environ = os.environ if environ is None else environ
    if environ.get(DATA_ENV):
        return Path(environ[DATA_ENV]).expanduser()
    return checkout_data_dir()


def eval_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``crossmodal eval --karpathy`` keeps the indexes of splits.

    ``$CROSSMODAL_CACHE/eval``, else ``<data>/cache/eval`` (beside the datasets it indexes, so that
    clearing the data folder clears it too), else ``~/.cache/crossmodal/eval``.
    """
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser() / "eval"
    data = data_dir(environ)
    if data is not None:
        return data / "cache" / "eval"
    return Path.home() / ".cache" / "crossmodal" / "eval"
