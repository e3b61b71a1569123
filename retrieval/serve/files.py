"""Indexed image files as the server hands them out: found by catalog id only, thumbnails cached on disk.

A request never names a path. The path comes from the catalog, and it must still resolve to a
regular file inside the folder it was indexed under, so neither ``..`` nor a symlink planted
under a root can make the server read anything else.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from indexer.catalog import ItemView
from indexer.errors import CrossmodalError
from indexer.imageio import NotAnImage, TooLarge, open_image

THUMB_SIZE, MAX_THUMB_SIZE = 256, 1024
JPEG_QUALITY = 85


class NotFound(CrossmodalError):
    """Nothing to answer with: an unknown item, or a file gone from disk (HTTP 404)."""


class Forbidden(CrossmodalError):
    """An indexed path that now leads outside its indexed folder (HTTP 403)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crossmodal" / "thumbs"


def indexed_file(view: ItemView | None, item_id: int) -> Path:
    """The file of an image item, checked to be a regular file still inside its indexed folder."""
    if view is None:
        raise NotFound(f"no item {item_id} in this index")
    if view.kind != "image":
        raise NotFound(f"item {item_id} is a {view.kind}, not an image; its image is item {view.image_id}")
    if view.path is None or view.root is None:
        raise NotFound(f"item {item_id} is named by its address ({view.path}), not a local file: open it there")
    try:
        root = Path(view.root).resolve(strict=True)
        path = Path(view.path).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"the file of item {item_id} is gone from disk ({view.path}); "
                       "run `crossmodal index` to update the index") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable folder
        raise NotFound(f"cannot open the file of item {item_id} ({view.path}): {exc}") from None
    if not path.is_relative_to(root):
        raise Forbidden(f"the file of item {item_id} now leads outside its indexed folder; not served")
    if not path.is_file():
        raise NotFound(f"the file of item {item_id} is no longer a regular file ({view.path})")
    return path


class Thumbnails:
    """JPEG thumbnails of indexed images, made on first request and kept in ``folder``.

    A thumbnail's key is made of the file's real path, size and mtime and the thumbnail size, so a
    changed file gets a new thumbnail and its key serves as the HTTP ETag.
    """

    def __init__(self, folder: Path, max_megapixels: float | None):
        self.folder = Path(folder)
        self.max_megapixels = max_megapixels

    def get(self, view: ItemView | None, item_id: int, size: int = THUMB_SIZE) -> tuple[Path, str]:
        """(path of the cached JPEG, its ETag)."""
        source = indexed_file(view, item_id)
        stat = source.stat()
        key = hashlib.sha256(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}".encode()).hexdigest()[:32]
        cached = self.folder / key[:2] / f"{key}.jpg"
        if not cached.exists():
            self._make(source, cached, size, item_id)
        return cached, key

    def _make(self, source: Path, cached: Path, size: int, item_id: int) -> None:
        try:
            image = open_image(source, draft_size=size, max_megapixels=self.max_megapixels)
        except FileNotFoundError:
            raise NotFound(f"the file of item {item_id} is gone from disk ({source})") from None
        except TooLarge as exc:
            raise NotFound(f"the file of item {item_id} is too large to show: {exc}") from None
        except (NotAnImage, OSError, ValueError, SyntaxError) as exc:  # changed on disk since it was indexed
            raise NotFound(f"the file of item {item_id} can no longer be read as an image: {exc}") from None
        image.thumbnail((size, size))
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: two requests for one thumbnail never see half a file.
            with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".part", delete=False) as out:
                image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
            os.replace(out.name, cached)
        except OSError as exc:
            raise CrossmodalError(f"cannot write the thumbnail cache {self.folder}: {exc.strerror or exc}; "
                                  "give --cache-dir a writable folder") from None
