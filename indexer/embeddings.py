"""Precomputed embeddings in clip-retrieval's layout: import them into an index, export an index as them.

The layout, shards numbered alike and row-aligned::

    DIR/img_emb/img_emb_0.npy            (n, dim) image vectors
    DIR/text_emb/text_emb_0.npy          (n, dim) caption vectors (optional)
    DIR/metadata/metadata_0.parquet      columns image_path, caption (or metadata_0.jsonl)

Each row is one image–caption pair; an image on several rows is one image with several captions.
Our export adds rows clip-retrieval does not write but reads back here: an image without captions
(caption null, text vector zeros) and a standalone text (image_path null, image vector zeros).
An import is a root like a folder: importing the same DIR again adds, replaces and removes to match.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .build import finish, rebuilt
from .catalog import CAPTION, TEXT, ImageWrite, TextWrite
from .errors import CrossmodalError, SourceError
from .identity import ModelIdentity
from .sources import Problem
from .spec import IndexSpec
from .store import MODALITIES, IndexStore

if TYPE_CHECKING:
    from .pipeline import IndexSummary

SHARD_ROWS = 1_000_000
WRITE_CHUNK = 10_000


@dataclass(frozen=True)
class Pair:
    image_path: str | None
    caption: str | None
    image_vector: np.ndarray | None
    text_vector: np.ndarray | None
    where: str  # shard file and row, for messages


def _shard_number(path: Path) -> int:
    found = re.search(r"_(\d+)$", path.stem)
    return int(found.group(1)) if found else -1


@dataclass(frozen=True)
class _Shard:
    images: Path
    texts: Path | None
    metadata: Path


def _metadata_file(directory: Path, number: int) -> Path:
    for suffix in (".parquet", ".jsonl"):
        path = directory / "metadata" / f"metadata_{number}{suffix}"
        if path.is_file():
            return path
    raise SourceError(f"no metadata/metadata_{number}.parquet or .jsonl beside img_emb_{number}.npy in {directory}")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise SourceError("reading .parquet metadata needs pyarrow: pip install pyarrow") from None
    return pq


def _count_rows(path: Path) -> int:
    """Rows of a metadata file; a JSON line that does not parse is an error here, before anything is written."""
    if path.suffix == ".parquet":
        return _parquet().ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _json_lines(path))


def _metadata_rows(path: Path) -> Iterator[dict]:
    """A metadata file's rows one at a time, read in batches rather than whole."""
    if path.suffix == ".parquet":
        for batch in _parquet().ParquetFile(path).iter_batches(batch_size=WRITE_CHUNK):
            yield from batch.to_pylist()
    else:
        yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{number}: not JSON ({exc.msg}); fix or remove that line") from None


def _shards(directory: Path, dim: int, problems: list[Problem]) -> list[_Shard]:
    """The shards to read, every one checked before anything is written: a missing metadata file, a line
    that is not JSON or vectors of another size stop the import whole; a shard whose files disagree on
    the row count is skipped as a problem."""
    images = sorted((directory / "img_emb").glob("img_emb_*.npy"), key=_shard_number)
    if not images:
        raise SourceError(f"no img_emb/img_emb_*.npy under {directory}: is it clip-retrieval's embeddings folder?")
    shards = []
    for image_file in images:
        number = _shard_number(image_file)
        text_file = directory / "text_emb" / f"text_emb_{number}.npy"
        shard = _Shard(image_file, text_file if text_file.is_file() else None, _metadata_file(directory, number))
        shapes = {f: np.load(f, mmap_mode="r").shape for f in (shard.images, shard.texts) if f is not None}
        sizes = {**{f.name: shape[0] for f, shape in shapes.items()}, shard.metadata.name: _count_rows(shard.metadata)}
        if len(set(sizes.values())) != 1 or len(shapes[image_file]) != 2:
            problems.append(Problem(str(image_file), f"shard skipped: row counts differ ({sizes})"))
            continue
        for path, shape in shapes.items():
            if len(shape) == 2 and shape[1] != dim:
                raise SourceError(f"{path} holds {shape[1]}-d vectors but the model makes {dim}-d ones; "
                                  "import with the --model/--pretrained that produced them")
        shards.append(shard)
    return shards


def read_pairs(directory: Path, dim: int, problems: list[Problem]) -> Iterator[Pair]:
    """Every row of every shard under ``directory``, one at a time; unusable rows become problems, not errors.

    The shards are checked when this is called, before the first row is asked for.
    """
    return _pairs(_shards(Path(directory), dim, problems), problems)


def _pairs(shards: list[_Shard], problems: list[Problem]) -> Iterator[Pair]:
    for shard in shards:
        images = np.load(shard.images, mmap_mode="r")
        texts = np.load(shard.texts, mmap_mode="r") if shard.texts is not None else None
        for row, meta in enumerate(_metadata_rows(shard.metadata)):
            where = f"{shard.metadata.name}:{row}"
            image_path, caption = meta.get("image_path"), meta.get("caption")
            if image_path is None and caption is None:
                problems.append(Problem(where, "row has neither image_path nor caption; skipped"))
                continue
            image_vector = _usable(images[row]) if image_path is not None else None
            text_vector = _usable(texts[row]) if texts is not None and caption is not None else None
            if image_path is not None and image_vector is None:
                problems.append(Problem(where, f"image vector of {image_path} is zero or not finite; skipped"))
                image_path = None
            if caption is not None and text_vector is None:
                if texts is not None:
                    problems.append(Problem(where, "caption vector is zero or not finite; caption skipped"))
                caption = None
            if image_path is not None or caption is not None:
                yield Pair(image_path, caption, image_vector, text_vector, where)


def _usable(vector: np.ndarray) -> np.ndarray | None:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if np.isfinite(norm) and norm > 0 else None


def _vector_digest(vector: np.ndarray) -> str:
    return "vector:" + hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def import_embeddings(source: Path, index_dir: Path, identity: ModelIdentity, spec: IndexSpec | None = None,
                      images_root: Path | None = None, engine: str = "local",
                      ray_address: str | None = None) -> IndexSummary:
    """Index precomputed vectors from ``source`` (clip-retrieval layout) as one root of ``index_dir``.

    Rows are read and written ``WRITE_CHUNK`` at a time, so memory holds a chunk of vectors, not the
    import (plus the root's paths and caption keys, to find what is gone). A side that a spec with
    ``shards`` has not trained yet is built at the end from the catalog, shard by shard (in Ray tasks
    with ``engine="ray"``).
    """
    from .pipeline import IndexSummary  # the pipeline imports torch, which export_embeddings does without

    started = time.perf_counter()
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise SourceError(f"embeddings folder not found: {source}")
    summary = IndexSummary(index=str(Path(index_dir).resolve()), root=str(source))
    problems: list[Problem] = []
    pairs = read_pairs(source, identity.embed_dim, problems)  # checks every shard before the index is touched

    root = Path(images_root).expanduser().resolve() if images_root is not None else None

    def place(path: str) -> str:  # relative paths are taken from --images-root when given
        if root is None or "://" in path or Path(path).is_absolute():
            return path
        return str(root / path)

    with IndexStore.open_for_writing(Path(index_dir), identity, spec) as store:
        store.lock_root(source)
        vectors = {m: store.load_vectors(m)[0] for m in MODALITIES}
        later = {m for m, held in vectors.items() if store.spec.params.get("shards") and not held.trained}
        run = _Import(store, store.catalog.root_id(source), vectors, later, summary)
        while chunk := list(itertools.islice(pairs, WRITE_CHUNK)):
            run.write(chunk, place)
        run.replace_changed()
        run.remove_what_is_gone()
        store.catalog.mark_root_indexed(run.root_id)
        for modality in later:
            vectors[modality] = rebuilt(store, modality, store.spec, engine=engine, ray_address=ray_address)
        report = finish(store, vectors)
        summary.build = report.as_dict() if report else None
        for modality in MODALITIES:
            store.save_vectors(modality, vectors[modality])
    summary.problems = [str(p) for p in problems]
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


class _Import:
    """One import's writes, chunk by chunk, and what it has seen, to remove the rest at the end."""

    def __init__(self, store: IndexStore, root_id: int, vectors: dict, later: set[str], summary: IndexSummary):
        self.store, self.catalog, self.root_id, self.summary = store, store.catalog, root_id, summary
        self.vectors, self.later = vectors, later  # sides in `later` are built from the catalog at the end
        self.known = self.catalog.image_states(root_id)
        self.image_ids = {path: state.id for path, state in self.known.items()}
        self.seen: set[str] = set()
        self.existing = {(t.image_id, t.text, t.sha256): t.id for t in self.catalog.text_states(root_id)}
        self.wanted: set[tuple[int | None, str, str]] = set()
        self.replaced: list[int] = []  # images whose vector changed: taken out of the index once, at the end

    def write(self, pairs: list[Pair], place) -> None:
        writes = []
        for pair in pairs:
            path = place(pair.image_path) if pair.image_path is not None else None
            if path is None or path in self.seen:
                continue  # an image on several rows is one image: its first row's vector counts
            self.seen.add(path)
            state, digest = self.known.get(path), _vector_digest(pair.image_vector)
            if state is not None and state.sha256 == digest:
                self.summary.unchanged += 1
                continue
            writes.append(ImageWrite(path, 0, 0, digest, vector=pair.image_vector, id=state.id if state else None))
        if writes:
            ids = self.catalog.write_images(self.root_id, writes)
            self.image_ids.update((w.rel, i) for w, i in zip(writes, ids))
            new = [(i, w.vector) for w, i in zip(writes, ids) if w.id is None]
            self.replaced += [w.id for w in writes if w.id is not None]
            self.summary.updated += len(writes) - len(new)
            self.summary.added += len(new)
            if new:
                self._add("image", [i for i, _ in new], [v for _, v in new])
        self._write_captions(pairs, place)

    def _write_captions(self, pairs: list[Pair], place) -> None:
        """Captions keyed by (image, text, vector): a new key is a new text, a known one stays as it is."""
        new = []
        for pair in pairs:
            if pair.caption is None:
                continue
            image_id = self.image_ids.get(place(pair.image_path)) if pair.image_path is not None else None
            key = (image_id, pair.caption, _vector_digest(pair.text_vector))
            if key in self.wanted:
                continue
            self.wanted.add(key)
            if key in self.existing:
                self.summary.texts_unchanged += 1
                continue
            new.append(TextWrite(CAPTION if image_id is not None else TEXT, pair.caption, key[2],
                                 f"embeddings:{pair.where}", 0, image_id, pair.text_vector))
        if new:
            self._add("text", self.catalog.write_texts(self.root_id, new), [w.vector for w in new])
            self.summary.texts_added += len(new)

    def replace_changed(self) -> None:
        """The changed images' new vectors into the index: one removal (HNSW and flat scan their whole id map
        per removal), then the stored vectors in batches."""
        replaced = np.asarray(sorted(self.replaced), dtype=np.int64)
        self._remove("image", replaced)
        for start in range(0, len(replaced), WRITE_CHUNK):
            batch = replaced[start:start + WRITE_CHUNK]
            self._add("image", batch, list(self.store.fetch_vectors(batch)))

    def remove_what_is_gone(self) -> None:
        gone = [state.id for path, state in self.known.items() if path not in self.seen]
        deleted = self.catalog.delete_items(gone)  # with the captions of those images
        for modality in MODALITIES:
            self._remove(modality, np.asarray(deleted, dtype=np.int64))
        deleted_set = set(deleted)
        stale = [i for key, i in self.existing.items() if key not in self.wanted and i not in deleted_set]
        self._remove("text", np.asarray(self.catalog.delete_items(stale), dtype=np.int64))
        self.summary.removed = len(gone)
        self.summary.texts_removed = len(deleted) - len(gone) + len(stale)
        self.summary.encoded_images = 0

    def _add(self, modality: str, ids, vectors: list[np.ndarray]) -> None:
        if modality not in self.later:
            self.vectors[modality].add(np.asarray(ids, dtype=np.int64), np.stack(vectors))

    def _remove(self, modality: str, ids: np.ndarray) -> None:
        if modality not in self.later and len(ids):
            self.vectors[modality].remove(ids)


def export_embeddings(index_dir: Path, out: Path, fmt: str = "parquet") -> dict:
    """Write the index's vectors as clip-retrieval's layout under ``out``; returns counts."""
    if fmt not in ("parquet", "jsonl"):
        raise CrossmodalError(f"unknown metadata format '{fmt}': use parquet or jsonl")
    out = Path(out)
    with IndexStore.open(Path(index_dir)) as store:
        catalog, dim = store.catalog, store.meta.embed_dim
        image_ids, text_ids = catalog.vector_ids("image"), catalog.vector_ids("text")
        items = catalog.items(np.concatenate([image_ids, text_ids]).tolist())
        image_vectors = dict(zip(image_ids.tolist(), store.fetch_vectors(image_ids))) if len(image_ids) else {}
        text_vectors = dict(zip(text_ids.tolist(), store.fetch_vectors(text_ids))) if len(text_ids) else {}
    rows: list[tuple[str | None, str | None, np.ndarray, np.ndarray]] = []
    captioned = set()
    zeros = np.zeros(dim, dtype=np.float32)
    for text_id, vector in text_vectors.items():
        item = items[text_id]
        image_vector = image_vectors.get(item.image_id) if item.image_id is not None else None
        rows.append((item.path if image_vector is not None else None, item.text,
                     image_vector if image_vector is not None else zeros, vector))
        captioned.add(item.image_id)
    rows += [(items[i].path, None, vector, zeros) for i, vector in image_vectors.items() if i not in captioned]
    for name in ("img_emb", "text_emb", "metadata"):
        (out / name).mkdir(parents=True, exist_ok=True)
    shards = max(1, -(-len(rows) // SHARD_ROWS))
    for shard in range(shards):
        part = rows[shard * SHARD_ROWS:(shard + 1) * SHARD_ROWS]
        for column, name in ((2, "img_emb"), (3, "text_emb")):
            stacked = np.stack([r[column] for r in part]) if part else np.zeros((0, dim), np.float32)
            np.save(out / name / f"{name}_{shard}.npy", stacked)
        meta = [{"image_path": r[0], "caption": r[1]} for r in part]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"image_path": pa.array([m["image_path"] for m in meta], pa.string()),
                              "caption": pa.array([m["caption"] for m in meta], pa.string())})
            pq.write_table(table, out / "metadata" / f"metadata_{shard}.parquet")
        else:
            (out / "metadata" / f"metadata_{shard}.jsonl").write_text(
                "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta), encoding="utf-8")
    return {"rows": len(rows), "images": len(image_vectors), "texts": len(text_vectors), "shards": shards,
            "out": str(out.resolve())}
