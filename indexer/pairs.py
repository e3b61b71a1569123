"""Image–caption pairs from any source the indexer reads: a folder with captions, a captions file, a Karpathy JSON.

Training and evaluation need images grouped with their captions rather than the indexer's flat
stream of files and texts; this module gives them that shape, :class:`PairedImage`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError
from .sources import Problem, read_captions_file, sidecar_captions, walk_images


@dataclass(frozen=True)
class PairedImage:
    path: Path
    captions: tuple[str, ...]


def read_karpathy(path: Path, images_root: Path | None, split: str | None) -> list[PairedImage]:
    """Images of one split of a Karpathy-style JSON (``images[].filepath/filename/split/sentences[].raw``).

    ``images_root`` defaults to the JSON's folder; ``split`` None takes every image. COCO's
    ``restval`` belongs to training, as in the usual Karpathy setup.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = data["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path}: not a Karpathy split JSON ({exc})") from exc
    root = Path(images_root) if images_root else Path(path).parent
    wanted = {"train", "restval"} if split == "train" else {split}
    out = []
    for number, entry in enumerate(entries):
        try:
            if split is not None and entry["split"] not in wanted:
                continue
            image = root / entry.get("filepath", "") / entry["filename"]
            captions = tuple(s["raw"].strip() for s in entry["sentences"] if s.get("raw", "").strip())
        except (KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{path}: image entry {number} lacks {exc}") from exc
        out.append(PairedImage(image, captions))
    if not out:
        raise SourceError(f"{path}: no images in split '{split}'")
    return out


def read_folder_pairs(root: Path, captions_file: Path | None, problems: list[Problem]) -> list[PairedImage]:
    """Images under ``root`` with their sidecar captions and those of ``captions_file``."""
    if not Path(root).is_dir():
        raise SourceError(f"not a folder: {root}")
    by_image: dict[str, list[str]] = defaultdict(list)
    files = {}
    for image in walk_images(Path(root), problems=problems):
        files[image.rel] = image.path
        by_image[image.rel] += [r.text for r in sidecar_captions(image, problems)]
    if captions_file:
        for record in read_captions_file(Path(captions_file), problems):
            if record.image in files:
                by_image[record.image].append(record.text)
            else:
                problems.append(Problem(f"{captions_file}:{record.line}", f"no image {record.image} under {root}"))
    return [PairedImage(files[rel], tuple(by_image[rel])) for rel in sorted(files)]


def read_pairs(source: Path, *, split: str | None = None, images_root: Path | None = None,
               captions_file: Path | None = None, problems: list[Problem] | None = None) -> list[PairedImage]:
    """Pairs from a folder (sidecars, optional captions file) or a Karpathy ``.json``.

    Images without captions are left out and reported in ``problems``.
    """
    problems = [] if problems is None else problems
    source = Path(source)
    if source.suffix.lower() == ".json" and source.is_file():
        pairs = read_karpathy(source, images_root, split)
    else:
        pairs = read_folder_pairs(source, captions_file, problems)
    with_captions = [p for p in pairs if p.captions]
    if len(with_captions) < len(pairs):
        problems.append(Problem(str(source), f"{len(pairs) - len(with_captions)} images without captions left out"))
    if not with_captions:
        raise SourceError(f"{source}: no image has a caption; add NAME.txt sidecars or --captions FILE")
    return with_captions
