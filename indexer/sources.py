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
import stat
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class SpecialFile:
    """A FIFO, socket or device (or a symlink to one) named like an image: recorded, never opened."""

    rel: str
    path: Path
    kind: str  # "FIFO", "socket", "character device", "block device"
    size: int
    mtime_ns: int


@dataclass
class WalkReport:
    """What a walk saw besides the images it yields: what it could not look at, and what it left out."""

    unread_dirs: set[str] = field(default_factory=set)  # prefixes ("" the root, "a/b/") not listed this time
    unread_files: set[str] = field(default_factory=set)  # root-relative paths whose stat failed
    special: list[SpecialFile] = field(default_factory=list)  # not regular files, with an image extension
    other_special: Counter[str] = field(default_factory=Counter)  # kind -> not regular files with other names
    other_types: Counter[str] = field(default_factory=Counter)  # extension -> regular files of types not indexed

    def unseen(self, rel: str) -> bool:
        """Whether the file ``rel`` may still exist: the walk could not look where it would be."""
        if rel in self.unread_files:
            return True
        parts = rel.split("/")
        return any("/".join(parts[:n]) + ("/" if n else "") in self.unread_dirs for n in range(len(parts)))


_SPECIAL_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"))


def _entry_kind(entry: os.DirEntry) -> str:
    """"dir", "link" (a symlink to a directory), "file" (regular), or a special file's kind; raises OSError."""
    if entry.is_symlink():
        mode = os.stat(entry.path).st_mode  # raises when the target is missing
        if stat.S_ISDIR(mode):
            return "link"
    elif entry.is_dir(follow_symlinks=False):
        return "dir"
    elif entry.is_file(follow_symlinks=False):
        return "file"
    else:
        mode = entry.stat(follow_symlinks=False).st_mode
    if stat.S_ISREG(mode):
        return "file"
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "special file")


class _Walker:
    """One walk: directories are listed once each; symlinked ones after the real tree, so an image
    reachable both ways is indexed under its real path."""

    def __init__(self, include_hidden: bool, patterns: tuple[str, ...], problems: list[Problem],
                 report: WalkReport, not_counted: frozenset[str]):
        self.include_hidden, self.patterns, self.not_counted = include_hidden, patterns, not_counted
        self.problems, self.report = problems, report
        self.walked: dict[tuple[int, int], str] = {}  # a directory's identity -> the prefix it was walked under
        self.links: deque[tuple[Path, str]] = deque()

    def walk(self, root: Path) -> Iterator[ImageFile]:
        yield from self.directory(root, "")
        while self.links:
            yield from self.directory(*self.links.popleft())

    def first_visit(self, path: Path, prefix: str, st: os.stat_result) -> bool:
        """Whether this folder is new to the walk; if not, say why it is not walked again."""
        first = self.walked.setdefault((st.st_dev, st.st_ino), prefix)
        if first == prefix:
            return True
        if prefix.startswith(first):  # it lies inside the folder it leads to
            where = f"'{first.rstrip('/')}'" if first else "the root"
            message = f"symlink loop: it leads back to {where}, already visited; not followed"
        else:
            message = f"already indexed through '{first.rstrip('/')}'; not indexed again under this path"
        self.problem(path, message)
        return False

    def problem(self, path: Path | str, message: str) -> None:
        self.problems.append(Problem(catalog_name(str(path)), message))

    def cannot_stat(self, path: Path, rel: str, exc: OSError) -> None:
        # It may be a file or a folder (a symlink to an unmounted disk): what was indexed under it stays.
        self.report.unread_files.add(rel)
        self.report.unread_dirs.add(rel + "/")
        broken = os.path.islink(path) and isinstance(exc, FileNotFoundError)
        reason = "broken symlink, its target is missing" if broken else f"cannot stat: {exc.strerror or exc}"
        self.problem(path, f"{reason}; what was indexed under this name is kept")

    def directory(self, path: Path, prefix: str) -> Iterator[ImageFile]:
        try:
            if not self.first_visit(path, prefix, os.stat(path)):
                return
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.report.unread_dirs.add(prefix)
            self.problem(path, f"cannot read directory: {exc.strerror or exc}; what was indexed under it is kept")
            return
        images: set[str] = set()  # names of this folder's images, to tell their sidecar captions
        others: list[os.DirEntry] = []
        for entry in entries:
            name = self.name_of(entry)
            rel = f"{prefix}{name}"
            if (not self.include_hidden and _is_hidden(name)) or _excluded(rel, name, self.patterns):
                continue
            try:
                kind = _entry_kind(entry)
                if kind == "dir":
                    yield from self.directory(Path(entry.path), rel + "/")
                    continue
                if kind == "link":
                    self.links.append((Path(entry.path), rel + "/"))
                    continue
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    if kind == "file":
                        others.append(entry)
                    else:
                        self.report.other_special[kind] += 1
                    continue
                st = entry.stat()
            except OSError as exc:
                self.cannot_stat(Path(entry.path), rel, exc)
                continue
            if kind != "file":
                self.report.special.append(SpecialFile(rel, Path(entry.path), kind, st.st_size, st.st_mtime_ns))
                continue
            images.add(entry.name)
            yield ImageFile(rel=rel, path=Path(entry.path), size=st.st_size, mtime_ns=st.st_mtime_ns)
        self.count_others(others, images)

    def count_others(self, others: list[os.DirEntry], images: set[str]) -> None:
        stems = {str(Path(name).with_suffix("")) for name in images}
        for entry in others:
            if entry.name.endswith(SIDECAR_SUFFIX) and entry.name[: -len(SIDECAR_SUFFIX)] in stems:
                continue  # a sidecar caption file (sidecar_captions reads NAME.txt beside NAME.jpg)
            if self.not_counted and os.path.realpath(entry.path) in self.not_counted:
                continue
            self.report.other_types[Path(catalog_name(entry.name)).suffix.lower()] += 1

    def name_of(self, entry: os.DirEntry) -> str:
        if _utf8_safe(entry.name):
            return entry.name
        name = catalog_name(entry.name)
        self.problem(entry.path, f"name is not valid UTF-8; indexed as '{name}' (its bytes as \\xNN)")
        return name


def walk_images(
    root: Path,
    *,
    include_hidden: bool = False,
    exclude: Iterable[str] = (),
    problems: list[Problem] | None = None,
    report: WalkReport | None = None,
    not_counted: Iterable[Path] = (),
) -> Iterator[ImageFile]:
    """Yield every regular image file below ``root``, depth first, in sorted order.

    ``exclude`` holds glob patterns matched against the root-relative path and the bare name
    (so ``--exclude '*.gif'`` and ``--exclude 'raw/*'`` both work). Folders reached through a
    symlink are walked after the real tree, once each; symlink loops are reported and not followed.
    What could not be read, non-regular files (never opened) and files of other types are
    reported in ``problems`` and ``report``; ``not_counted`` files (captions files passed by the
    user) are not counted as other types.
    """
    walker = _Walker(include_hidden, tuple(exclude), problems if problems is not None else [],
                     report if report is not None else WalkReport(),
                     frozenset(os.path.realpath(p) for p in not_counted))
    yield from walker.walk(Path(root))


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
