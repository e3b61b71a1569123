"""``crossmodal verify``: is the index on disk whole, and can what is wrong be mended from stored data?

Checks the catalog file itself (SQLite's ``PRAGMA quick_check``) and its schema version, that each
vector file opens and holds exactly the catalog's vectors (each once), leftovers of interrupted
writes, and image files gone from disk. ``repair`` rebuilds vector files from the vectors stored in
the catalog and removes temp files; images missing on disk are only reported, since re-running
``crossmodal index`` on their folder is what removes them (they may be on a drive that is not
mounted). A damaged catalog is reported and left alone: it is the source everything else is rebuilt
from, so nothing here can rebuild it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .build import finish
from .catalog import SCHEMA_VERSION
from .errors import CatalogDamaged, VectorFileError
from .sources import filesystem_path
from .spec import LEARNED
from .store import MODALITIES, IndexStore, leftover_temp_files
from .vectors import StaleVectorFile, VectorStore


@dataclass
class VectorCheck:
    catalog: int  # vectors the catalog holds
    file: int | None  # vectors the file holds (None: no file, or unreadable)
    missing: int = 0  # in the catalog, not in the file
    extra: int = 0  # in the file, not in the catalog
    duplicates: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and not (self.missing or self.extra or self.duplicates)


@dataclass
class VerifyReport:
    index: str
    schema_version: int | None  # None: the catalog is too damaged to tell
    schema_expected: int
    vectors: dict[str, VectorCheck] = field(default_factory=dict)
    missing_files: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    catalog_problems: list[str] = field(default_factory=list)  # what SQLite finds wrong with catalog.sqlite
    catalog_damaged: str | None = None  # then: the one-line message, with what to do

    @property
    def ok(self) -> bool:
        return (self.catalog_damaged is None and self.schema_version == self.schema_expected
                and all(v.ok for v in self.vectors.values()) and not self.temp_files)

    def as_dict(self) -> dict:
        vectors = {m: {**asdict(v), "ok": v.ok} for m, v in self.vectors.items()}
        return {**asdict(self), "ok": self.ok, "vectors": vectors}


def _check_vectors(store: IndexStore, modality: str) -> VectorCheck:
    expected = store.catalog.vector_ids(modality)
    path = store.vector_path(modality)
    check = VectorCheck(catalog=len(expected), file=None)
    if not path.exists():
        if len(expected):  # kinds that learn write no file until trained: the next index run trains them
            check.problem = f"{path.name} is missing" + (" (not trained yet)" if store.spec.kind in LEARNED else "")
        return check
    try:
        held = VectorStore.load(path, store.spec, store.meta.embed_dim)
    except (StaleVectorFile, VectorFileError) as exc:
        check.problem = str(exc)
        return check
    ids = held.ids()
    if store.spec.kind == "hnsw":  # tombstones are ids the catalog dropped, filtered until the graph is rebuilt
        ids = ids[np.isin(ids, expected)]
    unique = np.unique(ids)
    check.file = len(ids)
    check.duplicates = len(ids) - len(unique)
    check.missing = len(np.setdiff1d(expected, unique, assume_unique=True))
    check.extra = len(np.setdiff1d(unique, expected, assume_unique=True))
    return check


def verify(index_dir: Path, repair: bool = False, check_files: bool = True) -> VerifyReport:
    """Check the index at ``index_dir``; with ``repair``, rebuild what stored data can rebuild."""
    temp_files = [str(p) for p in leftover_temp_files(Path(index_dir))]  # before open_locked clears them
    opener = IndexStore.open_locked if repair else IndexStore.open
    try:
        with opener(Path(index_dir)) as store:
            problems = store.catalog.quick_check()
            if problems:  # checking vectors or repairing from a damaged source would only spread the damage
                raise CatalogDamaged(store.catalog.where, problems)
            report = VerifyReport(str(store.directory.resolve()), store.catalog.schema_version(), SCHEMA_VERSION)
            report.vectors = {m: _check_vectors(store, m) for m in MODALITIES}
            report.temp_files = temp_files
            if check_files:
                report.missing_files = [item.path for item in store.catalog.images()
                                        if item.path and "://" not in item.path and not Path(item.path).exists()
                                        and not filesystem_path(item.path).exists()]
            if repair:
                _repair(store, report)
    except CatalogDamaged as exc:  # found by quick_check, or by SQLite on the way (opening, reading)
        return VerifyReport(str(Path(index_dir).resolve()), None, SCHEMA_VERSION, temp_files=temp_files,
                            catalog_problems=exc.problems, catalog_damaged=str(exc))
    return report


def _repair(store: IndexStore, report: VerifyReport) -> None:
    for name in report.temp_files:  # open_locked removed them already: say so
        report.repaired.append(f"removed {name}, left by an interrupted write")
    report.temp_files = []
    broken = [m for m, check in report.vectors.items() if not check.ok]
    if not broken:
        return
    for modality in broken:
        if report.vectors[modality].problem and store.vector_path(modality).exists():
            store.vector_path(modality).unlink()  # unreadable or of another kind: rebuilt below
    vectors = {m: store.load_vectors(m)[0] for m in MODALITIES}  # re-synced from the catalog
    finish(store, vectors)
    for modality in broken:
        store.save_vectors(modality, vectors[modality])
        count = report.vectors[modality].catalog
        report.repaired.append(f"rebuilt {store.vector_path(modality).name} from the {count:,} vectors in the catalog")
    report.vectors = {m: _check_vectors(store, m) for m in MODALITIES}
