"""What to index: image files under a root, and the captions and texts that go with them.

Everything here is plain Python with no model or database: the folder walk is a generator
over ``os.scandir`` and the caption readers parse files into :class:`TextRecord` values,
reporting bad lines as :class:`Problem` values instead of stopping.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

# Every format Pillow reads (pillow-heif adds HEIF/HEIC) that people keep photos and pictures in; not
# fonts, PDFs, textures or scientific containers, which it also opens.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".jp2", ".j2k", ".jpx", ".jpf", ".jpc", ".j2c", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".psd",
    ".pcx", ".qoi", ".heic", ".heif", ".hif", ".avif",
})
SIDECAR_SUFFIX = ".txt"


@dataclass(frozen=True)
class ImageFile:
    """An image found by the walk; ``rel`` uses forward slashes on every platform."""

    rel: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class TextRecord:
    """One caption or standalone text. ``image`` is the root-relative image path, or None."""

    text: str
    image: str | None
    origin: str  # where it came from, e.g. "sidecar:a/b.txt" or "captions:/abs/file.jsonl"
    line: int


@dataclass(frozen=True)
class Problem:
    """A non-fatal issue with an input: reported in the summary, never raised."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def catalog_name(name: str) -> str:
    """A file name as UTF-8 text: bytes that are not UTF-8 written as \\xNN (the catalog holds text)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def filesystem_path(text: str) -> Path:
    """The path :func:`catalog_name` wrote as ``text``, with its \\xNN bytes back."""
    if "\\x" not in text:
        return Path(text)
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return Path(os.fsdecode(raw))


def _utf8_safe(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def walk_images(
    root: Path,
    *,
    include_hidden: bool = False,
    exclude: Iterable[str] = (),
    problems: list[Problem] | None = None,
) -> Iterator[ImageFile]:
    """Yield every image file below ``root``, depth first, in sorted order.

    ``exclude`` holds glob patterns matched against the root-relative path and the bare name
    (so ``--exclude '*.gif'`` and ``--exclude 'raw/*'`` both work). Directories that cannot be
    read and symlink loops are reported in ``problems`` and skipped.
    """
    patterns = tuple(exclude)
    root = Path(root)
    seen_dirs: set[tuple[int, int]] = set()

    def visit(directory: Path, prefix: str) -> Iterator[ImageFile]:
        try:
            st = directory.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                if problems is not None:
                    problems.append(Problem(str(directory), "directory already visited (symlink loop?)"))
                return
            seen_dirs.add(key)
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if problems is not None:
                problems.append(Problem(str(directory), f"cannot read directory: {exc.strerror or exc}"))
            return
        for entry in entries:
            name = entry.name
            if not _utf8_safe(name):
                name = catalog_name(name)
                if problems is not None:
                    problems.append(Problem(catalog_name(entry.path),
                                            f"name is not valid UTF-8; indexed as '{name}' (its bytes as \\xNN)"))
            rel = f"{prefix}{name}"
            if (not include_hidden and _is_hidden(name)) or _excluded(rel, name, patterns):
                continue
            try:
                if entry.is_dir():
                    yield from visit(Path(entry.path), rel + "/")
                    continue
                if not entry.is_file() or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                st = entry.stat()
            except OSError as exc:
                if problems is not None:
                    problems.append(Problem(entry.path, f"cannot stat: {exc.strerror or exc}"))
                continue
            yield ImageFile(rel=rel, path=Path(entry.path), size=st.st_size, mtime_ns=st.st_mtime_ns)

    yield from visit(root, "")


def _clean_lines(raw: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(raw.splitlines(), start=1):
        line = line.strip()
        if line:
            yield number, line


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "not valid UTF-8; decoded with replacement characters"))
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot read: {exc.strerror or exc}"))
        return None


def sidecar_captions(image: ImageFile, problems: list[Problem]) -> list[TextRecord]:
    """Captions from ``NAME.txt`` beside ``NAME.jpg``: one caption per non-empty line."""
    sidecar = image.path.with_suffix(SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return []
    raw = _read_text(sidecar, problems)
    if raw is None:
        return []
    rel = image.rel[: len(image.rel) - len(image.path.suffix)] + SIDECAR_SUFFIX
    return [TextRecord(text, image.rel, f"sidecar:{rel}", n) for n, text in _clean_lines(raw)]


def file_origin(kind: str, path: Path) -> str:
    """The origin that records from a captions or texts file carry, e.g. "captions:/abs/caps.jsonl"."""
    return f"{kind}:{Path(path).resolve()}"


def _read_input_file(path: Path, kind: str, problems: list[Problem]) -> tuple[str, str]:
    """The text of a captions/texts file and the origin its records carry."""
    if not path.is_file():
        raise SourceError(f"{kind} file not found: {path}")
    raw = _read_text(path, problems)
    if raw is None:
        raise SourceError(f"cannot read {kind} file: {path}")
    return raw, file_origin(kind, path)


def _normalise_rel(value: str) -> str:
    value = value.strip().replace("\\", "/")
    while value.startswith("./"):
        value = value[2:]
    return value


def read_captions_file(path: Path, problems: list[Problem]) -> list[TextRecord]:
    """Read image captions from JSONL, CSV or TSV (chosen by extension).

    JSONL rows are ``{"image": "rel/path.jpg", "caption": "..."}`` or ``{"image": ..., "captions":
    [...]}``; CSV/TSV need ``image`` and ``caption`` columns. A bad row is reported with its line
    number and skipped; a file that cannot be used at all raises :class:`SourceError`.
    """
    path = Path(path)
    raw, origin = _read_input_file(path, "captions", problems)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return list(_captions_from_jsonl(raw, path, origin, problems))
    if suffix in (".csv", ".tsv"):
        return list(_captions_from_table(raw, path, origin, "\t" if suffix == ".tsv" else ",", problems))
    raise SourceError(f"{path}: unknown captions format '{suffix}'; use .jsonl, .csv or .tsv")


def _captions_from_jsonl(raw: str, path: Path, origin: str, problems: list[Problem]) -> Iterator[TextRecord]:
    for number, line in _clean_lines(raw):
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, f"not valid JSON ({exc.msg}); line skipped"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            problems.append(Problem(where, 'needs an object with an "image" string; line skipped'))
            continue
        captions = row.get("captions", row.get("caption"))
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            problems.append(Problem(where, 'needs "caption" (string) or "captions" (list of strings)'))
            continue
        for caption in captions:
            if caption.strip():
                yield TextRecord(caption.strip(), _normalise_rel(row["image"]), origin, number)


def _captions_from_table(
    raw: str, path: Path, origin: str, delimiter: str, problems: list[Problem]
) -> Iterator[TextRecord]:
    reader = csv.DictReader(raw.splitlines(), delimiter=delimiter)
    columns = set(reader.fieldnames or [])
    if not {"image", "caption"} <= columns:
        raise SourceError(
            f"{path}: needs 'image' and 'caption' columns in its header, found {sorted(columns) or 'none'}"
        )
    for row in reader:
        number = reader.line_num
        image, caption = row.get("image"), row.get("caption")
        if not image or caption is None:
            problems.append(Problem(f"{path}:{number}", "empty image or caption; row skipped"))
            continue
        if caption.strip():
            yield TextRecord(caption.strip(), _normalise_rel(image.strip()), origin, number)


def read_texts_file(path: Path, problems: list[Problem]) -> list[TextRecord]:
    """Standalone texts: one per non-empty line, or JSONL (``.jsonl``) with a ``text`` field."""
    path = Path(path)
    raw, origin = _read_input_file(path, "texts", problems)
    records = []
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in _clean_lines(raw):
        text = line
        if is_jsonl:
            try:
                row = json.loads(line)
                text = row["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(Problem(f"{path}:{number}", 'needs a JSON object with a "text" string'))
                continue
        if text.strip():
            records.append(TextRecord(text.strip(), None, origin, number))
    return records
