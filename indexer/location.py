"""Which catalog an index folder uses: its own SQLite file, or the PostgreSQL database it names.

An index is a folder (its vector files) and a catalog (the truth they are derived from). A folder
bound to PostgreSQL records the database's URL in ``catalog.url`` when ``--catalog`` first names it,
so every later command on the folder finds the same catalog without being told again, and a
different one is refused instead of mixing vectors from two catalogs. Import-light: the CLI
resolves this before it loads SQLAlchemy.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CatalogError
from .layout import CATALOG_FILE

CATALOG_URL_FILE = "catalog.url"
ENV_VAR = "CROSSMODAL_CATALOG"
SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def catalog_location(directory: Path) -> Path | str:
    """The catalog of the index at ``directory``: the URL it is bound to, else its own ``catalog.sqlite``;
    a folder with neither gets ``$CROSSMODAL_CATALOG`` when that is set (bound on its first write)."""
    bound = bound_catalog(directory)
    wanted = os.environ.get(ENV_VAR, "").strip() or None
    if bound is not None:
        if wanted is not None and not _same(bound, wanted):
            raise CatalogError(f"the index at {directory} uses the catalog {_hide_password(bound)}, but {ENV_VAR} "
                               f"names {_hide_password(wanted)}; unset it or give another --index folder")
        return bound
    own = Path(directory) / CATALOG_FILE
    if wanted is None or own.exists():
        return own
    return require_postgres_url(wanted, ENV_VAR)


def bound_catalog(directory: Path) -> str | None:
    """The URL in the folder's ``catalog.url``, None if it has none."""
    pointer = Path(directory) / CATALOG_URL_FILE
    try:
        url = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CatalogError(f"cannot read {pointer}: {exc.strerror or exc}") from None
    if not is_postgres_url(url):
        raise CatalogError(f"{pointer} does not hold a PostgreSQL URL ({url[:80]!r}); write the catalog's URL "
                           "into it, or delete it if the index is a SQLite one")
    return url


def bind_catalog(directory: Path, url: str) -> None:
    """Make the index at ``directory`` use the PostgreSQL catalog ``url`` (``--catalog``); refuses a folder
    that holds or names another catalog. The file is private to its owner: the URL may hold a password
    (better kept in ~/.pgpass or PGPASSWORD)."""
    directory = Path(directory)
    require_postgres_url(url)
    current = bound_catalog(directory)
    if current is not None:
        if _same(current, url):
            return
        raise CatalogError(f"the index at {directory} uses the catalog {_hide_password(current)}, not "
                           f"{_hide_password(url)}; give another --index folder for another catalog")
    if (directory / CATALOG_FILE).exists():
        raise CatalogError(f"the index at {directory} has its own SQLite catalog ({directory / CATALOG_FILE}); "
                           "give a new --index folder for a PostgreSQL catalog")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / CATALOG_URL_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process bound it just now: it must be the same catalog
        return bind_catalog(directory, url)
    except OSError as exc:
        raise CatalogError(f"cannot record the catalog in {directory}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(url + "\n")


def is_postgres_url(url: str) -> bool:
    return url.lower().startswith(SCHEMES)


def require_postgres_url(url: str, what: str = "catalog") -> str:
    """``url`` if it is a PostgreSQL URL; else a CatalogError naming it (``what``: where it was given)."""
    if not is_postgres_url(url):
        raise CatalogError(f"{what} {url!r} is not a PostgreSQL URL: use postgresql://USER@HOST[:PORT]/DATABASE "
                           "(or leave --catalog out for the SQLite file in the index folder)")
    return url


def _same(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        rest = url.split("://", 1)[1]
        return _hide_password("postgresql://" + rest).rstrip("/")
    return norm(a) == norm(b)


def _hide_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}://{credentials}{at}{host}"
