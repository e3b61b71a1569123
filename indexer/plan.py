"""Incremental planning: what changed between the folder on disk and the catalog.

Pure functions over plain values. Hashing is passed in as a function so tests can count calls:
a file is hashed before decoding only when its hash can save work (a touched file that may be
unchanged, or a new file whose size matches a vanished one, i.e. a possible move).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import ImageState, TextState
from .skips import NOT_REGULAR, RetrySettings, cause_of, worth_retrying
from .sources import ImageFile, Problem, SpecialFile, TextRecord, WalkReport


@dataclass(frozen=True)
class EncodeJob:
    """A file to decode and encode; ``item_id`` is set when it replaces an existing row."""

    file: ImageFile
    item_id: int | None = None


@dataclass
class ImagePlan:
    unchanged: list[ImageState] = field(default_factory=list)
    restat: list[tuple[int, ImageFile]] = field(default_factory=list)  # same content, new size/mtime
    moved: list[tuple[int, ImageFile]] = field(default_factory=list)
    encode: list[EncodeJob] = field(default_factory=list)
    gone: list[ImageState] = field(default_factory=list)
    still_failing: list[ImageState] = field(default_factory=list)  # failed before, nothing changed that could help
    retried: int = 0  # jobs of ``encode`` that failed before and are tried again although unchanged
    kept_unseen: list[ImageState] = field(default_factory=list)  # where the walk could not look: kept as is
    not_regular: list[tuple[SpecialFile, int | None]] = field(default_factory=list)  # to record as skipped


def plan_images(files: Iterable[ImageFile], known: dict[str, ImageState], hash_file: Callable[[Path], str],
                walk: WalkReport | None = None, retry: RetrySettings | None = None) -> ImagePlan:
    """Compare the walk with the catalog's rows for the same root.

    A path seen before with the same size and mtime is unchanged. A path with a new size or mtime
    is hashed: same hash means only its stat changed, else it is re-encoded under its old id. A new
    path whose hash equals a vanished file's is a move and keeps that file's id and vector. Only
    files the walk saw missing are gone: rows under a folder it could not read stay (``walk``). An
    unchanged file that failed before is tried again when ``retry`` says what it depended on changed.
    """
    walk = walk or WalkReport()
    plan = ImagePlan()
    seen: set[str] = set()
    new: list[ImageFile] = []
    for f in files:
        seen.add(f.rel)
        state = known.get(f.rel)
        if state is None:
            new.append(f)
        elif (state.size, state.mtime_ns) == (f.size, f.mtime_ns):
            if state.error is None:
                plan.unchanged.append(state)
            elif retry is not None and worth_retrying(state.skip_info, retry):
                plan.encode.append(EncodeJob(f, state.id))
                plan.retried += 1
            else:
                plan.still_failing.append(state)
        elif state.error is None and state.sha256 is not None and hash_file(f.path) == state.sha256:
            plan.restat.append((state.id, f))
        else:
            plan.encode.append(EncodeJob(f, state.id))
    _plan_not_regular(plan, walk.special, known, seen)

    vanished = [s for rel, s in known.items() if rel not in seen and not walk.unseen(rel)]
    plan.kept_unseen = [s for rel, s in known.items() if rel not in seen and walk.unseen(rel)]
    movable: dict[int, dict[str, list[ImageState]]] = defaultdict(lambda: defaultdict(list))
    for state in vanished:
        if state.error is None and state.sha256 is not None and state.size is not None:
            movable[state.size][state.sha256].append(state)
    moved_ids: set[int] = set()
    for f in new:
        candidates = movable.get(f.size)
        if candidates:
            matches = candidates.get(hash_file(f.path))
            if matches:
                state = matches.pop()
                moved_ids.add(state.id)
                plan.moved.append((state.id, f))
                continue
        plan.encode.append(EncodeJob(f))
    plan.gone = [s for s in vanished if s.id not in moved_ids]
    return plan


def _plan_not_regular(plan: ImagePlan, special: Iterable[SpecialFile], known: dict[str, ImageState],
                      seen: set[str]) -> None:
    for f in special:
        seen.add(f.rel)
        state = known.get(f.rel)
        if state is not None and cause_of(state.skip_info) == NOT_REGULAR and \
                (state.size, state.mtime_ns) == (f.size, f.mtime_ns):
            plan.still_failing.append(state)
        else:
            plan.not_regular.append((f, state.id if state is not None else None))


@dataclass
class TextPlan:
    add: list[tuple[TextRecord, int | None]] = field(default_factory=list)  # record, linked image id
    remove: list[int] = field(default_factory=list)
    kept: int = 0


def plan_texts(records: Iterable[TextRecord], known: Iterable[TextState], synced_origins: Callable[[str], bool],
               image_ids: dict[str, int], root: Path, problems: list[Problem]) -> TextPlan:
    """Diff the wanted captions/texts against the catalog's, as multisets of (origin, image, text).

    Only rows whose origin is being synced this run (``synced_origins``) can be removed, so texts
    from a captions file not passed this time stay indexed. Captions naming an image that is not in
    the root are reported and skipped.
    """
    wanted: Counter[tuple[str, int | None, str]] = Counter()
    first_record: dict[tuple[str, int | None, str], list[TextRecord]] = defaultdict(list)
    for record in records:
        image_id = None
        if record.image is not None:
            image_id = image_ids.get(record.image)
            if image_id is None:
                problems.append(Problem(f"{record.origin.split(':', 1)[1]}:{record.line}",
                                        f"image '{record.image}' is not in {root}; caption skipped"))
                continue
        key = (record.origin, image_id, record.text)
        wanted[key] += 1
        first_record[key].append(record)

    plan = TextPlan()
    have: Counter[tuple[str, int | None, str]] = Counter()
    for state in known:
        key = (state.origin or "", state.image_id, state.text)
        if wanted[key] > have[key]:
            have[key] += 1
            plan.kept += 1
        elif synced_origins(state.origin or ""):
            plan.remove.append(state.id)
        else:
            plan.kept += 1
    for key, count in wanted.items():
        for record in first_record[key][have[key]:count]:
            plan.add.append((record, key[1]))
    return plan
